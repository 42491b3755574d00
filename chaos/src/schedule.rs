//! The fault schedule of a scenario, expanded into steps at offsets from the start of the
//! run: window starts and ends, agent kills, coordinator kills. Agents chosen at random and
//! restart delays come from the seed.

use std::time::Duration;

use crate::proxy::Mode;
use crate::rng::Rng;
use crate::scenario::{Scenario, ScheduleAction};

/// A step of the schedule, at an offset from the start.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    Window {
        agents: Vec<usize>,
        mode: Mode,
        /// (agent (0-based), builds it must hold) before the window starts; when not empty,
        /// the window's `Heal` is scheduled when it starts, `length` later.
        hold: Vec<(usize, usize)>,
        /// When the window was first due (for the `hold_wait` bound).
        due: Duration,
        hold_wait: Duration,
        length: Duration,
        control_lag: Duration,
    },
    Heal {
        agents: Vec<usize>,
        /// How long their control exchanges stay held after the heal.
        control_lag: Duration,
    },
    KillAgents {
        agents: Vec<usize>,
        restart: Option<[f64; 2]>,
        rep: u64,
        /// Drawn by the seed (`random_agents`), not named.
        random: bool,
    },
    RestartAgent(usize),
    KillCoordinator {
        restart: Option<[f64; 2]>,
        rep: u64,
    },
}

/// Expand the scenario's schedule into steps sorted by time.
pub(crate) fn timeline(s: &Scenario, seed: u64) -> Vec<(Duration, Step)> {
    let mut steps = Vec::new();
    for (i, item) in s.schedule.iter().enumerate() {
        for rep in 0..item.repeat {
            let at = Duration::from_secs_f64(item.at_s + rep as f64 * item.every_s);
            let mut rng = Rng::derive(seed, &[0x73_63_68, i as u64, rep as u64]);
            let agents: Vec<usize> = if item.agents.is_empty() {
                rng.choose(s.agents.count, item.random_agents)
            } else {
                item.agents.iter().map(|a| a - 1).collect()
            };
            let key = (i as u64) << 32 | rep as u64;
            match item.action {
                ScheduleAction::Partition | ScheduleAction::Refuse => {
                    let mode = if item.action == ScheduleAction::Partition {
                        Mode::Blackhole
                    } else {
                        Mode::Refuse
                    };
                    let length = Duration::from_secs_f64(item.duration_s);
                    let hold: Vec<(usize, usize)> = item
                        .when_holding
                        .iter()
                        .enumerate()
                        .map(|(k, a)| (a - 1, item.hold_min.get(k).copied().unwrap_or(1)))
                        .collect();
                    let heal_now = hold.is_empty();
                    let control_lag = Duration::from_secs_f64(item.control_lag_s);
                    steps.push((
                        at,
                        Step::Window {
                            agents: agents.clone(),
                            mode,
                            hold,
                            due: at,
                            hold_wait: Duration::from_secs_f64(item.hold_wait_s),
                            length,
                            control_lag,
                        },
                    ));
                    if heal_now {
                        steps.push((
                            at + length,
                            Step::Heal {
                                agents,
                                control_lag,
                            },
                        ));
                    }
                }
                ScheduleAction::KillAgent => steps.push((
                    at,
                    Step::KillAgents {
                        agents,
                        restart: item.restart_after_s,
                        rep: key,
                        random: item.agents.is_empty(),
                    },
                )),
                ScheduleAction::KillCoordinator => steps.push((
                    at,
                    Step::KillCoordinator {
                        restart: item.restart_after_s,
                        rep: key,
                    },
                )),
            }
        }
    }
    steps.sort_by_key(|(t, _)| *t);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_expand_in_time_order_with_seeded_picks() {
        let s: Scenario = toml::from_str(
            "name = \"x\"\ntime_bound_s = 60\n[graph]\nbuilds = 4\n[agents]\ncount = 6\n\
             [[schedule]]\naction = \"partition\"\nat_s = 5\nduration_s = 10\nagents = [1, 3]\n\
             [[schedule]]\naction = \"kill-agent\"\nat_s = 2\nrepeat = 3\nevery_s = 4\nrandom_agents = 2\n",
        )
        .unwrap();
        let steps = timeline(&s, 7);
        let times: Vec<f64> = steps.iter().map(|(t, _)| t.as_secs_f64()).collect();
        assert_eq!(times, [2.0, 5.0, 6.0, 10.0, 15.0]);
        match &steps[1].1 {
            Step::Window { agents, mode, .. } => {
                assert_eq!(agents, &[0, 2]);
                assert_eq!(*mode, Mode::Blackhole);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&steps[4].1, Step::Heal { agents, .. } if agents == &[0, 2]));
        let picks = |seed| -> Vec<Vec<usize>> {
            timeline(&s, seed)
                .into_iter()
                .filter_map(|(_, st)| match st {
                    Step::KillAgents { agents, .. } => Some(agents),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(picks(7), picks(7));
        assert!(picks(7).iter().all(|a| a.len() == 2));
    }
}

//! Property tests for the `.drv` parser and printer: `parse(print(d)) == d` for generated
//! derivations with arbitrary bytes in every string (quotes, backslashes, newlines, NUL,
//! invalid UTF-8), empty strings and keys, many outputs of every kind, and keys in any order;
//! and `print(parse(f)) == f` for the printed form, which is canonical by construction.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{Derivation, DerivationOutput, Hash, HashAlgo};

/// Bytes with the characters that need escaping over-represented.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => any::<u8>(),
        1 => prop::sample::select(vec![b'"', b'\\', b'\n', b'\r', b'\t', 0u8, 0xff, b'(', b',', b'[']),
    ];
    prop::collection::vec(byte, 0..24)
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    bytes().prop_map(|mut b| {
        b.insert(0, b'/');
        b
    })
}

fn algo() -> impl Strategy<Value = HashAlgo> {
    prop::sample::select(vec![
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ])
}

fn method_algo() -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), algo())
        .prop_map(|(r, a)| format!("{}{a}", if r { "r:" } else { "" }).into_bytes())
}

/// An output of any kind, valid as Nix 2.8 reads it.
fn output() -> impl Strategy<Value = DerivationOutput> {
    prop_oneof![
        path().prop_map(DerivationOutput::input_addressed),
        (
            path(),
            any::<bool>(),
            algo(),
            prop::collection::vec(any::<u8>(), 64)
        )
            .prop_map(|(path, r, algo, digest)| {
                let hash = Hash {
                    algo,
                    bytes: digest[..algo.size()].to_vec(),
                };
                DerivationOutput {
                    path,
                    hash_algo: format!("{}{algo}", if r { "r:" } else { "" }).into_bytes(),
                    hash: hash.to_base16().into_bytes(),
                }
            }),
        method_algo().prop_map(|hash_algo| DerivationOutput {
            hash_algo,
            ..DerivationOutput::default()
        }),
        Just(DerivationOutput::default()),
        method_algo().prop_map(|hash_algo| DerivationOutput {
            hash_algo,
            hash: b"impure".to_vec(),
            ..DerivationOutput::default()
        }),
    ]
}

/// Unique keys, in sorted or reversed order (both are accepted; only duplicates are not).
fn keyed<V: std::fmt::Debug + Clone>(
    value: impl Strategy<Value = V>,
    max: usize,
) -> impl Strategy<Value = Vec<(Vec<u8>, V)>> {
    (
        prop::collection::btree_map(bytes(), value, 0..max),
        any::<bool>(),
    )
        .prop_map(|(m, rev): (BTreeMap<Vec<u8>, V>, bool)| {
            let mut v: Vec<_> = m.into_iter().collect();
            if rev {
                v.reverse();
            }
            v
        })
}

fn unique(
    strategy: impl Strategy<Value = Vec<u8>>,
    max: usize,
) -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::btree_set(strategy, 0..max).prop_map(|s| s.into_iter().collect())
}

fn derivation() -> impl Strategy<Value = Derivation> {
    let inputs = keyed(unique(bytes(), 4), 6).prop_map(|v| {
        v.into_iter()
            .map(|(mut k, names)| {
                k.insert(0, b'/');
                (k, names)
            })
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect::<Vec<_>>()
    });
    (
        keyed(output(), 12),
        inputs,
        unique(path(), 6),
        bytes(),
        bytes(),
        prop::collection::vec(bytes(), 0..6),
        keyed(bytes(), 12),
    )
        .prop_map(
            |(outputs, input_drvs, input_srcs, platform, builder, args, env)| Derivation {
                outputs,
                input_drvs,
                input_srcs,
                platform,
                builder,
                args,
                env,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_print_roundtrip(d in derivation()) {
        let printed = d.print();
        let parsed = Derivation::parse(&printed);
        prop_assert!(parsed.is_ok(), "{:?}", parsed);
        let parsed = parsed.unwrap();
        prop_assert_eq!(&parsed, &d);
        prop_assert_eq!(parsed.print(), printed);
    }

    #[test]
    fn every_output_kind_is_valid(o in output()) {
        prop_assert!(o.kind().is_ok(), "{:?}", o);
    }

    #[test]
    fn garbage_never_panics(input in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Derivation::parse(&input);
    }

    #[test]
    fn mutations_never_panic(d in derivation(), at in any::<prop::sample::Index>(), b in any::<u8>()) {
        let mut printed = d.print();
        let i = at.index(printed.len());
        printed[i] = b;
        if let Err(e) = Derivation::parse(&printed) {
            prop_assert!(e.offset <= printed.len());
        }
    }
}

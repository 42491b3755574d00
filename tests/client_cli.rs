//! The client's error messages, through the real `kiln` binary: a coordinator that cannot be
//! reached, and one that refuses a request with an `ErrorBody`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::Command;

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env_remove("KILN_COORDINATOR").env_remove("KILN_TOKEN");
    cmd
}

/// A port with nothing listening: bind one, then close it.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Serves exactly one request with `status` and `body`, returns the request head it got.
fn one_shot_server(
    status: &'static str,
    body: &'static str,
) -> (String, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (stream, _) = l.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body_in = vec![0; content_length];
        reader.read_exact(&mut body_in).unwrap();
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        head
    });
    (url, handle)
}

#[test]
fn unreachable_coordinator_says_how_to_point_at_one() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let out = kiln()
        .args(["builds", "--coordinator", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach the coordinator at {url}")),
        "{err}"
    );
    assert!(err.contains("is `kiln coordinator` running?"), "{err}");
    assert!(err.contains("KILN_COORDINATOR"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn unreachable_coordinator_from_the_environment() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let out = kiln()
        .args(["agents", "--json"])
        .env("KILN_COORDINATOR", &url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach the coordinator at {url}")),
        "{err}"
    );
}

#[test]
fn error_body_is_shown_with_code_and_status() {
    let (url, server) = one_shot_server(
        "422 Unprocessable Entity",
        r#"{"error":{"code":"unknown_agent_system","message":"system \"pdp11-unix\" is not one Kiln knows"}}"#,
    );
    let out = kiln()
        .args([
            "agent",
            "new",
            "a1",
            "--system",
            "pdp11-unix",
            "--coordinator",
            &url,
        ])
        .env("KILN_TOKEN", "t0ken")
        .output()
        .unwrap();
    let head = server.join().unwrap();
    assert!(head.starts_with("POST /api/v1/agents HTTP/1.1"), "{head}");
    assert!(
        head.contains("Authorization: Bearer t0ken")
            || head.contains("authorization: Bearer t0ken"),
        "{head}"
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"the coordinator refused POST /api/v1/agents: system "pdp11-unix" is not one Kiln knows (unknown_agent_system, HTTP 422)"#),
        "{err}"
    );
}

#[test]
fn non_kiln_error_says_what_came_back() {
    let (url, server) = one_shot_server("404 Not Found", "no such thing");
    let out = kiln()
        .args(["build", "show", "7", "--coordinator", &url])
        .output()
        .unwrap();
    let head = server.join().unwrap();
    assert!(head.starts_with("GET /api/v1/builds/7 HTTP/1.1"), "{head}");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 404") && err.contains("no such thing"),
        "{err}"
    );
}

#[test]
fn submit_of_a_missing_drv_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let drv = dir.path().join("00000000000000000000000000000000-x.drv");
    let out = kiln()
        .args([
            "submit",
            "--coordinator",
            "http://127.0.0.1:1",
            "--store-dir",
        ])
        .arg(dir.path())
        .arg(&drv)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&drv.display().to_string()), "{err}");
}

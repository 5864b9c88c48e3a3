//! `fake-model [--listen ADDR] [SCRIPT.json]`: the testkit's fake model
//! server as a process, for tests of the `tinyfat` binary. It queues the
//! scripts of the JSON array in SCRIPT.json, prints its base URL
//! (`http://127.0.0.1:PORT`) as the first line of stdout, and serves until
//! killed. More scripts can be queued with `POST /_fake/scripts` and the
//! recorded requests read with `GET /_fake/requests`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use tinyfat_testkit::{FakeModel, Script};

const USAGE: &str = "usage: fake-model [--listen ADDR] [SCRIPT.json]";

fn parse_args() -> Result<(SocketAddr, Option<String>), String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut script = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().ok_or("--listen needs an address")?;
                listen = value.parse().map_err(|e| format!("bad --listen address '{value}': {e}"))?;
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other if other.starts_with('-') => return Err(format!("unknown option {other}\n{USAGE}")),
            path if script.is_none() => script = Some(path.to_string()),
            _ => return Err(USAGE.to_string()),
        }
    }
    Ok((listen, script))
}

fn load(path: &str) -> Result<Vec<Script>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{path} is not a JSON array of scripts: {e}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (listen, scripts) =
        match parse_args().and_then(|(listen, path)| Ok((listen, path.map(|p| load(&p)).transpose()?))) {
            Ok(parsed) => parsed,
            Err(message) => {
                eprintln!("fake-model: {message}");
                return ExitCode::from(2);
            }
        };
    let fake = match FakeModel::start_on(listen).await {
        Ok(fake) => fake,
        Err(e) => {
            eprintln!("fake-model: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    fake.push_all(scripts.unwrap_or_default());
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{}", fake.base_url()).and_then(|()| stdout.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}

//! Prints what baton-bounce reads in a stored report, as `baton bounce classify --json` does,
//! without building the whole server: for scoring the rules on a corpus quickly.
//! `cargo run --release -p baton-bounce --example classify -- FILE`

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: classify FILE");
        std::process::exit(2);
    };
    match std::fs::read(&path) {
        Ok(raw) => {
            let records = baton_bounce::read(&raw, None);
            match serde_json::to_string(&records) {
                Ok(json) => println!("{json}"),
                Err(e) => eprintln!("{e}"),
            }
        }
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    }
}

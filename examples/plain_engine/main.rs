//! `cargo run --release --example plain_engine -- MODEL.gguf [PROMPT]`: the
//! plain example engine in lockstep with bitnet.cpp, through divergence's
//! public API; prints the verdict and writes `plain-engine-receipt.json`.

mod engine;

use divergence::candidate::{Candidate, CandidateError, LoadOptions};
use divergence::lockstep::{Mode, Prompt};
use divergence::receipt::{Receipt, RunRecord};
use engine::{Bug, PlainEngine};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(model) = args.next() else {
        eprintln!("usage: plain_engine MODEL.gguf [PROMPT]");
        return ExitCode::from(2);
    };
    let prompt = args.next().unwrap_or_else(|| "The quick brown fox".into());
    let record = RunRecord {
        model_path: model,
        prompt: Prompt::Text(prompt),
        steps: 4,
        mode: Mode::Resync,
        threads: 1,
        kv_type: divergence::KvType::F16,
        keep_going: false,
        faults: vec![],
        token_faults: vec![],
        policy_path: None,
    };
    let loader = |opts: &LoadOptions| -> Result<Box<dyn Candidate>, CandidateError> {
        Ok(Box::new(PlainEngine::load(opts, Bug::None)?))
    };
    // The reference runs in a worker process: our `divergence` binary.
    let worker = match divergence::reference::worker::default_exe() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match Receipt::run_with(&record, &loader, worker, None, None) {
        Ok(r) => {
            let path = PathBuf::from("plain-engine-receipt.json");
            if let Err(e) = r.write(&path) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            println!("{:?} (receipt {})", r.verdict, path.display());
            match &r.first_divergence {
                Some(d) => println!(
                    "first divergence: step {} layer {:?} stage {}, blame {:?}",
                    d.step, d.layer, d.stage, d.blame.blame
                ),
                None => println!("no divergence"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

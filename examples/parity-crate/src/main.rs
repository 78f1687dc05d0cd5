//! `parity-crate MODEL.gguf [--bug NAME]`: the engine in lockstep with
//! bitnet.cpp on a few token ids; prints the verdict, exits 1 on a
//! divergence. The reference worker is this binary itself.

use divergence::candidate::{Candidate, CandidateError, LoadOptions};
use divergence::lockstep::{self, Mode, Prompt, RunConfig, Verdict};
use parity_crate::{Bug, PlainEngine};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first() else {
        eprintln!("usage: parity-crate MODEL.gguf [--bug rope-adjacent-pairs]");
        return ExitCode::from(2);
    };
    let bug = match args.get(1..).unwrap_or_default() {
        [] => Bug::None,
        [flag, name] if flag == "--bug" && name == "rope-adjacent-pairs" => {
            Bug::RopeAdjacentPairs
        }
        other => {
            eprintln!("unknown arguments {other:?}");
            return ExitCode::from(2);
        }
    };
    let worker = match divergence::reference::worker::default_exe() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = RunConfig {
        steps: 2,
        mode: Mode::Resync,
        ..RunConfig::new(
            PathBuf::from(model),
            Prompt::Tokens(vec![1, 407, 259, 340]),
            divergence::compare::Policy::default_policy(),
            worker,
        )
    };
    let loader = move |opts: &LoadOptions| -> Result<Box<dyn Candidate>, CandidateError> {
        Ok(Box::new(PlainEngine::load(opts, bug)?))
    };
    match lockstep::run(&cfg, &loader) {
        Ok(o) => {
            println!("{:?}", o.verdict);
            if let Some(d) = &o.first_divergence {
                println!(
                    "first divergence: step {} layer {:?} stage {}, blamed on {:?}",
                    d.step, d.layer, d.stage, d.blame.blame
                );
            }
            if o.verdict == Verdict::NoDivergence {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

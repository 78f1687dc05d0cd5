//! `cargo run --release --example plain_engine -- MODEL.gguf [PROMPT] [--bug NAME]`:
//! the plain example engine in lockstep with bitnet.cpp, through
//! divergence's public API; prints the verdict and writes
//! `plain-engine-receipt.json`. `--bug rope-adjacent-pairs` or
//! `--bug ffn-sub-norm-weights` runs a broken variant.

mod engine;

use divergence::candidate::{Candidate, CandidateError, LoadOptions};
use divergence::lockstep::{Mode, Prompt};
use divergence::receipt::{Receipt, RunRecord};
use engine::{Bug, PlainEngine};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut bug = Bug::None;
    if let Some(i) = args.iter().position(|a| a == "--bug") {
        bug = match args.get(i + 1).map(String::as_str) {
            Some("rope-adjacent-pairs") => Bug::RopeAdjacentPairs,
            Some("ffn-sub-norm-weights") => Bug::FfnSubNormWeightsOfAttention,
            other => {
                eprintln!("unknown --bug {other:?} (rope-adjacent-pairs, ffn-sub-norm-weights)");
                return ExitCode::from(2);
            }
        };
        args.drain(i..i + 2);
    }
    let mut args = args.into_iter();
    let Some(model) = args.next() else {
        eprintln!("usage: plain_engine MODEL.gguf [PROMPT] [--bug NAME]");
        return ExitCode::from(2);
    };
    // The plain engine has no tokenizer: token ids ("1,407,259") are fed to
    // both engines; a text prompt is tokenized by bitnet.cpp only, and the
    // run is then `incomplete` (the ids were not compared).
    let text = args
        .next()
        .unwrap_or_else(|| "1,407,259,340,344,332".into());
    let prompt = match text
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<u32>, _>>()
    {
        Ok(ids) => Prompt::Tokens(ids),
        Err(_) => Prompt::Text(text),
    };
    let record = RunRecord {
        model_path: model,
        prompt,
        steps: 4,
        mode: Mode::Resync,
        threads: 1,
        kv_type: divergence::KvType::F16,
        keep_going: false,
        faults: vec![],
        token_faults: vec![],
        fault_layer: None,
        policy_path: None,
        chat: false,
        reference_ffn_act: Default::default(),
        ffn_act: None,
    };
    let loader = |opts: &LoadOptions| -> Result<Box<dyn Candidate>, CandidateError> {
        Ok(Box::new(PlainEngine::load(opts, bug)?))
    };
    // The reference runs in a worker process: this executable, started
    // again (DIVERGENCE_EXE overrides it).
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
            for note in &r.coverage.notes {
                println!("not judged: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

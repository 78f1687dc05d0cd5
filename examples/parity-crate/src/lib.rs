//! The engine under test. Here: divergence's plain example engine, included
//! from its folder; in your crate, your engine, implementing
//! [`divergence::candidate::Candidate`].

#[path = "../../plain_engine/engine.rs"]
pub mod engine;

pub use engine::{Bug, PlainEngine};

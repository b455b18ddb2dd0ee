//! The contract's rules, with no I/O: what a call does with what it read ([`rules`]), the
//! attempt a claim starts ([`attempt`]), what record a result becomes ([`settle`]), what a
//! record gives back ([`replay`]), and the options and policies they read.

pub(crate) mod attempt;
pub(crate) mod options;
pub(crate) mod outcome;
pub(crate) mod policy;
pub(crate) mod replay;
pub(crate) mod rules;
pub(crate) mod settle;

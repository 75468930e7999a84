//! Empty: a lib target lets observer list this crate as a build-dependency, so cargo rebuilds
//! the programs when they change.
#![no_std]

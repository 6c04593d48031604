//! Leaf helpers with no knowledge of the algorithm, devices or files: the seeded generator.

pub mod rng;

//! Answers made on the node without asking an upstream: static hosts entries, synthesized
//! (templated) answers and name rewrites, as CoreDNS's `hosts`, `template` and `rewrite`
//! plugins make them. They apply where CoreDNS applies them, behind the cache: a query the cache
//! cannot answer is checked here before it is forwarded, and what is made here is cached like an
//! upstream's answer, so the hit path does not change.

pub mod config;

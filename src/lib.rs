//! nodedns: a node-local DNS cache for Kubernetes.
pub mod node;

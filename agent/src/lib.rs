//! baton-agent: filled in by the agent issue.

pub mod kubernetes;

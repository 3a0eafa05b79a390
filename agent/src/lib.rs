//! baton-agent: filled in by the agent issue.

//! `kubectl-baton`: batonctl as a kubectl plugin (`kubectl baton status`),
//! always through the Kubernetes API (`--kube`).

#[tokio::main]
async fn main() {
    baton_coordinator::ctl::main(true).await
}

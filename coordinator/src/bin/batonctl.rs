//! The `batonctl` binary.

#[tokio::main]
async fn main() {
    baton_coordinator::ctl::main(false).await
}

//! State documents as the previous release (format 1, the audit inside the
//! state) wrote them, for the upgrade and downgrade tests of every store.

/// A document of the previous release: a grant, the release of that node,
/// the next grant (n2 holds token 2).
pub const DOCUMENT: &str =
    include_str!("../../coordinator/src/store/testdata/previous-release.json");

/// The same installation later, still on the previous release (a
/// downgrade that ran on, or a backup put back): n2 released at 12:00 and
/// n3 was granted token 3. Its audit is numbered 1..3 again, as the
/// previous release numbered it, so it has the numbers of [`DOCUMENT`]'s
/// records but other records.
pub fn later() -> serde_json::Value {
    let mut later: serde_json::Value =
        serde_json::from_str(DOCUMENT).expect("the previous release's document is JSON");
    later["state"]["audit"] = serde_json::json!([
        {"time":"2026-11-20T10:05:00Z","action":"grant","node":"n2","fencing_token":2,"actor":"coordinator","reason":"kernel CVE"},
        {"time":"2026-11-20T12:00:00Z","action":"release","node":"n2","fencing_token":2,"actor":"n2","reason":""},
        {"time":"2026-11-20T12:01:00Z","action":"grant","node":"n3","fencing_token":3,"actor":"coordinator","reason":"kernel CVE"}
    ]);
    later["state"]["last_token"] = serde_json::json!(3);
    let holding = later["state"]["holders"]["n2"].clone();
    later["state"]["holders"] = serde_json::json!({ "n3": holding });
    later["state"]["holders"]["n3"]["fencing_token"] = serde_json::json!(3);
    later
}

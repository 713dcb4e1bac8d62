//! The release and the commit every binary is built from (`--version`, the
//! start-up log line, the operator's `orderoperator_build_info` metric).

/// The release version: the workspace's (`Cargo.toml`), which the chart's
/// `version` and `appVersion`, the manifests' image tags and the CHANGELOG
/// follow (`make release-check`).
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The git commit (12 hex digits), or `unknown` when built outside a checkout
/// without `ORDERPIPELINE_GIT_COMMIT`.
pub const COMMIT: &str = env!("ORDERPIPELINE_COMMIT");

/// What `--version` prints after the binary's name: `0.1.0 (commit 1a2b3c4d5e6f)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ORDERPIPELINE_COMMIT"),
    ")"
);

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_the_release_and_the_commit() {
        assert!(super::VERSION.starts_with(super::RELEASE));
        assert!(super::VERSION.ends_with(&format!("(commit {})", super::COMMIT)));
        let c = super::COMMIT;
        assert!(
            c == "unknown" || (c.len() >= 7 && c.chars().all(|x| x.is_ascii_hexdigit())),
            "{c}"
        );
    }
}

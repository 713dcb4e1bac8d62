//! Embeds the git commit the binaries are built from: `ORDERPIPELINE_GIT_COMMIT`
//! when set (the image build has no `.git`: `hack/image` passes it as a build
//! argument), else `git rev-parse` of this checkout, else `unknown`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ORDERPIPELINE_GIT_COMMIT");
    let given = std::env::var("ORDERPIPELINE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let root: PathBuf = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let commit = given.or_else(|| {
        let head = git(&root, &["rev-parse", "--short=12", "HEAD"])?;
        // Built again when HEAD moves: HEAD itself, the branch it names, packed refs.
        if let Some(dir) = git(&root, &["rev-parse", "--absolute-git-dir"]) {
            let dir = PathBuf::from(dir);
            let mut watch = vec![dir.join("HEAD"), dir.join("packed-refs")];
            if let Some(branch) = git(&root, &["symbolic-ref", "-q", "HEAD"]) {
                watch.push(dir.join(branch));
            }
            for f in watch.iter().filter(|f| f.exists()) {
                println!("cargo:rerun-if-changed={}", f.display());
            }
        }
        Some(head)
    });
    let commit = commit.unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ORDERPIPELINE_COMMIT={commit}");
}

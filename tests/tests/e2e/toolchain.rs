//! Wrapping an unmodified Python toolchain, as a new user would: a virtualenv's interpreter
//! running the toolchain's scripts and a console entry point, pinned allowlist entries, a
//! partitions file with the publication's URL slugs, a secret from the environment and one from
//! a secrets directory (neither in the audit log), and a tool that decides its output's name
//! (a glob artefact) feeding the next step, and a backfill-level export after the last month.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use warpline_shared::audit::AuditEvent;
use warpline_tests::*;

/// The toolchain's sources: what a user already has, unmodified.
const FETCH_PY: &str = r#"
import os, sys, urllib.request, uuid
url, slug = sys.argv[1], sys.argv[2]
body = urllib.request.urlopen(url, timeout=30).read()
os.makedirs("out", exist_ok=True)
# The tool decides its output's name.
name = "out/%s-%s.csv" % (slug, uuid.uuid4().hex[:8])
with open(name, "wb") as f:
    f.write(body)
print("Written to " + name)
# A careless tool that prints its credentials.
print("fetched with token " + os.environ["TC_TOKEN"])
"#;

const LOAD_PY: &str = r#"
import hashlib, os, sys

def main():
    path, tag, warehouse = sys.argv[1], sys.argv[2], sys.argv[3]
    url = os.environ["TC_DATABASE_URL"]
    password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    rows = [l for l in open(path).read().splitlines()[1:] if l]
    os.makedirs(warehouse, exist_ok=True)
    with open(os.path.join(warehouse, tag + ".csv"), "w") as f:
        f.write("password_sha256=%s\n" % hashlib.sha256(password.encode()).hexdigest())
        f.write("\n".join(rows) + "\n")
    print("connected to %s" % url)
    print("loaded %d rows" % len(rows))
    return 0
"#;

/// The per-publication export, run once after the last month: it reads the partitions file
/// warpline wrote for it and the warehouse the loads filled.
const EXPORT_PY: &str = r#"
import json, os, sys
listing, warehouse, out = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for p in json.load(open(listing))["partitions"]:
    if p["state"] == "COMPLETE":
        tag = p["month"].replace("-", "")
        rows += open(os.path.join(warehouse, tag + ".csv")).read().splitlines()[1:]
with open(out, "w") as f:
    f.write("\n".join(rows) + "\n")
print("exported %d rows" % len(rows))
"#;

/// A toolchain directory: `venv/` (made by `python3 -m venv`), `scripts/fetch.py`, the package
/// `toolchain/` installed into the venv the way `pip install -e` does (a `.pth` file) with its
/// console entry point `venv/bin/tc-load`, the source files served over HTTP, and the pipeline.
struct Toolchain {
    dir: tempfile::TempDir,
    server: FaultServer,
}

impl Toolchain {
    fn new(faults: Vec<(&str, Vec<Fault>)>) -> Toolchain {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let venv = root.join("venv");
        let made = Command::new("python3")
            .args(["-m", "venv", "--without-pip"])
            .arg(&venv)
            .output()
            .expect("python3 is installed (the toolchain tests need it)");
        assert!(
            made.status.success(),
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        std::fs::create_dir_all(root.join("scripts")).unwrap();
        std::fs::write(root.join("scripts/fetch.py"), FETCH_PY).unwrap();
        std::fs::write(root.join("scripts/export.py"), EXPORT_PY).unwrap();
        std::fs::create_dir_all(root.join("toolchain")).unwrap();
        std::fs::write(root.join("toolchain/__init__.py"), "").unwrap();
        std::fs::write(root.join("toolchain/load.py"), LOAD_PY).unwrap();
        let site = std::fs::read_dir(venv.join("lib"))
            .unwrap()
            .map(|e| e.unwrap().path().join("site-packages"))
            .find(|p| p.is_dir())
            .expect("the venv has a site-packages");
        std::fs::write(site.join("toolchain.pth"), format!("{}\n", root.display())).unwrap();
        let entry = venv.join("bin/tc-load");
        std::fs::write(
            &entry,
            format!(
                "#!{}\nimport sys\nfrom toolchain.load import main\nsys.exit(main())\n",
                venv.join("bin/python").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        for (slug, n) in [("january-2024", 3), ("february-2024", 2), ("march-2024", 4)] {
            let rows: String = (0..n).map(|i| format!("{slug},{i}\n")).collect();
            std::fs::write(data.join(format!("{slug}.csv")), format!("name,n\n{rows}")).unwrap();
        }
        std::fs::create_dir_all(root.join("secrets")).unwrap();
        std::fs::write(root.join("secrets/db_password"), "pg-Secret-4711\n").unwrap();
        let faults: HashMap<String, Vec<Fault>> = faults
            .into_iter()
            .map(|(p, f)| (p.to_string(), f))
            .collect();
        let server = FaultServer::start(data, faults);
        let partitions: String = [
            ("2024-01", "january"),
            ("2024-02", "february"),
            ("2024-03", "march"),
        ]
        .iter()
        .map(|(m, slug)| format!("{m},{}/{slug}-2024.csv\n", server.base))
        .collect();
        std::fs::write(
            root.join("partitions.csv"),
            format!("month,url\n{partitions}"),
        )
        .unwrap();
        let tc = Toolchain { dir, server };
        tc.write_pipeline(
            "pipeline.json",
            &[
                "{config_dir}/scripts/fetch.py",
                "{url}",
                "{month:%B-%Y|lower}",
            ],
        );
        tc
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, rel: &str) -> String {
        self.root().join(rel).display().to_string()
    }

    /// The pipeline, with FETCH's arguments given.
    fn write_pipeline(&self, name: &str, fetch_args: &[&str]) -> String {
        let pipeline = serde_json::json!({
            "name": "toolchain",
            "workdir": "work",
            "vars": {"venv": "{config_dir}/venv", "python": "{config_dir}/venv/bin/python"},
            "retry": {"initial_ms": 10},
            "steps": [
                {"id": "FETCH", "command": "{python}", "args": fetch_args,
                 "env": {"TC_TOKEN": "{env:TC_API_TOKEN}"},
                 "artefacts": {"raw": {"glob": "out/*.csv"}},
                 "max_attempts": 1,
                 "validations": [{"kind": "file_size_min", "artefact": "raw", "min_bytes": 10}]},
                {"id": "LOAD", "command": "{venv}/bin/tc-load",
                 "args": ["{artefacts.raw}", "{month:%Y%m}", "{workdir}/warehouse"],
                 "env": {"TC_DATABASE_URL": "warehouse://loader:{secret:db_password}@localhost/tc"},
                 "validations": [{"kind": "log_regex_present", "pattern": "loaded \\d+ rows"}]},
                {"id": "EXPORT", "scope": "backfill", "when": "after", "command": "{python}",
                 "args": ["{config_dir}/scripts/export.py", "{partitions_file}", "{workdir}/warehouse",
                          "{workdir}/export-{first_month}..{last_month}.csv"],
                 "artefacts": {"export": "{workdir}/export-{first_month}..{last_month}.csv"},
                 "validations": [{"kind": "file_exists", "artefact": "export"},
                                 {"kind": "log_regex_present", "pattern": "exported \\d+ rows"}]}
            ]
        });
        let path = self.root().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&pipeline).unwrap()).unwrap();
        path.display().to_string()
    }

    /// The pinned allowlist: the venv's interpreter only with the fetch and export scripts,
    /// and the entry point.
    fn allow(&self) -> String {
        format!(
            "{python} {},{python} {},{}",
            self.path("scripts/fetch.py"),
            self.path("scripts/export.py"),
            self.path("venv/bin/tc-load"),
            python = self.path("venv/bin/python"),
        )
    }

    /// `warpline run PIPELINE --partitions-file partitions.csv ...` with the token set.
    fn run(&self, pipeline: &str, extra: &[&str]) -> Finished {
        let audit = self.path("audit.jsonl");
        let partitions = self.path("partitions.csv");
        let secrets = self.path("secrets");
        let allow = self.allow();
        let mut args = vec![
            "run",
            pipeline,
            "--partitions-file",
            &partitions,
            "--allow",
            &allow,
            "--secrets-dir",
            &secrets,
            "--audit",
            &audit,
            "--json",
            "--progress",
            "lines",
        ];
        args.extend_from_slice(extra);
        warpline(&args, &[("TC_API_TOKEN", TOKEN)])
    }
}

const TOKEN: &str = "tok-Abc123-very-secret";

#[test]
fn a_python_toolchain_runs_with_pinned_tools_partition_urls_and_secrets_kept_out() {
    let tc = Toolchain::new(Vec::new());
    let pipeline = tc.path("pipeline.json");
    let run = tc.run(&pipeline, &["--workers", "2"]);
    run.expect_code(0);
    let summary = run.summary();
    assert_eq!(
        summary["counts"]["COMPLETE"], 4,
        "3 months and the export: {summary:#}"
    );
    // The backfill-level export ran once, after the last month, over every month's rows.
    let export =
        std::fs::read_to_string(tc.root().join("work/export-2024-01..2024-03.csv")).unwrap();
    assert_eq!(export.lines().count(), 3 + 2 + 4, "{export}");
    let after = run_of(&summary, "_after");
    assert_eq!(
        (&after["state"], &after["attempts"]),
        (
            &serde_json::json!("COMPLETE"),
            &serde_json::json!({"EXPORT": 1})
        )
    );

    // The slugs came from the format spec, the URLs from the partitions file, and each
    // month's load read the file its fetch named.
    for (tag, slug, n) in [
        ("202401", "january-2024", 3),
        ("202402", "february-2024", 2),
        ("202403", "march-2024", 4),
    ] {
        let loaded =
            std::fs::read_to_string(tc.root().join(format!("work/warehouse/{tag}.csv"))).unwrap();
        let lines: Vec<&str> = loaded.lines().collect();
        assert_eq!(lines.len(), 1 + n, "{loaded}");
        assert!(lines[1].starts_with(slug), "{loaded}");
        // The secret reached the tool.
        let want = format!("password_sha256={}", sha256_hex("pg-Secret-4711"));
        assert_eq!(lines[0], want);
    }
    assert_eq!(tc.server.hits("/march-2024.csv"), 1);

    // The audit log verifies and holds neither secret, though both tools printed theirs.
    let audit = tc.path("audit.jsonl");
    warpline(&["audit", "verify", &audit], &[]).expect_code(0);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(TOKEN), "the token leaked into the audit log");
    assert!(
        !text.contains("pg-Secret-4711"),
        "the password leaked into the audit log"
    );
    assert!(
        text.contains("fetched with token [redacted]"),
        "the tool's output is redacted, not dropped"
    );
    // What ran is recorded: the venv's interpreter and the entry point, with their hashes,
    // and the glob artefact as the file the tool chose.
    let mut programs = Vec::new();
    let mut fetched = Vec::new();
    for r in audit_records(Path::new(&audit)) {
        if let AuditEvent::StepDispatched {
            step_id,
            command,
            args,
            ..
        } = &r.event
            && step_id == "FETCH"
        {
            assert_eq!(command, &tc.path("venv/bin/python"));
            fetched.push(args[2].clone());
        }
        if let AuditEvent::StepResult { outcome } = r.event {
            let res = outcome.result;
            programs.push((res.step_id.clone(), res.program.clone().unwrap()));
            assert_eq!(res.program_sha256.as_deref().map(str::len), Some(64));
            if res.step_id == "FETCH" {
                let raw = &res.artefacts["raw"];
                assert!(raw.contains("/out/") && raw.ends_with(".csv"), "{raw}");
            }
        }
    }
    fetched.sort();
    assert_eq!(fetched, ["february-2024", "january-2024", "march-2024"]);
    assert_eq!(programs.len(), 7, "{programs:?}");
    assert!(programs.contains(&("EXPORT".into(), tc.path("venv/bin/python"))));
    assert!(programs.contains(&("FETCH".into(), tc.path("venv/bin/python"))));
    assert!(programs.contains(&("LOAD".into(), tc.path("venv/bin/tc-load"))));
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[test]
fn preflight_refuses_inline_code_through_the_pinned_interpreter_before_anything_runs() {
    let tc = Toolchain::new(Vec::new());
    let evil = tc.write_pipeline("evil.json", &["-c", "open('pwned', 'w')", "{url}"]);
    let run = tc.run(&evil, &[]);
    run.expect_code(2);
    let err = run.stderr();
    assert!(
        err.contains("preflight failed, nothing was run"),
        "{}",
        run.context()
    );
    assert!(
        err.contains("inline code is never allowed through a pinned interpreter"),
        "{err}"
    );
    assert!(!tc.root().join("work/runs").exists(), "something ran");

    // Under --confine-args, an argument naming a file outside the run is refused up front;
    // the real pipeline (its script under the config's directory, an http URL) passes.
    let nosy = tc.write_pipeline(
        "nosy.json",
        &["{config_dir}/scripts/fetch.py", "file:///etc/hostname", "x"],
    );
    let run = tc.run(&nosy, &["--confine-args"]);
    run.expect_code(2);
    assert!(
        run.stderr()
            .contains("args[1] `file:///etc/hostname` names `/etc/hostname`, which is not under"),
        "{}",
        run.context()
    );
    assert!(!tc.root().join("work/runs").exists(), "something ran");
    let run = tc.run(&tc.path("pipeline.json"), &["--confine-args", "--dry-run"]);
    run.expect_code(0);

    // A mistyped --var is refused with the name it meant.
    let pipeline = tc.path("pipeline.json");
    let run = tc.run(&pipeline, &["--var", "pyhton=/usr/bin/python3"]);
    run.expect_code(2);
    assert!(
        run.stderr()
            .contains("unknown variable `pyhton` in --var: did you mean `python`?"),
        "{}",
        run.context()
    );

    // A missing secret is found before anything runs.
    let audit = tc.path("audit2.jsonl");
    let partitions = tc.path("partitions.csv");
    let allow = tc.allow();
    let run = warpline(
        &[
            "run",
            &pipeline,
            "--partitions-file",
            &partitions,
            "--allow",
            &allow,
            "--audit",
            &audit,
        ],
        &[],
    );
    run.expect_code(2);
    let err = run.stderr();
    assert!(err.contains("`{env:TC_API_TOKEN}` is not set"), "{err}");
    assert!(
        err.contains("`{secret:db_password}` needs a secrets directory"),
        "{err}"
    );
    assert!(!tc.root().join("work/runs").exists(), "something ran");
}

#[test]
fn dry_run_prints_what_would_run_and_runs_nothing() {
    let tc = Toolchain::new(Vec::new());
    let pipeline = tc.path("pipeline.json");
    let run = tc.run(&pipeline, &["--dry-run"]);
    run.expect_code(0);
    let out = run.stdout();
    assert!(
        out.contains("dry run of `toolchain`: 3 partitions × 2 steps"),
        "{out}"
    );
    let python = tc.path("venv/bin/python");
    let fetch = tc.path("scripts/fetch.py");
    assert!(
        out.contains(&format!(
            "argv: {python} {fetch} {}/january-2024.csv january-2024",
            tc.server.base
        )),
        "{out}"
    );
    assert!(out.contains("env TC_TOKEN={env:TC_API_TOKEN}"), "{out}");
    assert!(
        out.contains("env TC_DATABASE_URL=warehouse://loader:{secret:db_password}@localhost/tc"),
        "{out}"
    );
    assert!(out.contains("artefact raw: the one file matching"), "{out}");
    assert!(out.contains("202402"), "{out}");
    assert!(
        !out.contains("202403"),
        "only the first partitions in full: {out}"
    );
    assert!(out.contains("… and 1 more partitions"), "{out}");
    assert!(
        !out.contains(TOKEN) && !out.contains("pg-Secret-4711"),
        "{out}"
    );
    assert!(!tc.root().join("work").exists(), "something ran");
    assert_eq!(tc.server.hits("/january-2024.csv"), 0);
}

#[test]
fn a_bare_command_is_never_taken_from_beside_warpline() {
    // The DataWarp tools are built beside `warpline`; without --tools-dir they are not found.
    let run = warpline(
        &[
            "run",
            "examples/datawarp/pipeline.json",
            "--months",
            "2024-01",
            "--datasets",
            "ae_attendances",
            "--dry-run",
        ],
        &[("PATH", "/usr/bin:/bin")],
    );
    run.expect_code(2);
    assert!(
        run.stderr()
            .contains("command `url_to_manifest` not found (looked in `/usr/bin`, `/bin`)"),
        "{}",
        run.context()
    );
    let tools = bin_dir();
    let run = warpline(
        &[
            "run",
            "examples/datawarp/pipeline.json",
            "--months",
            "2024-01",
            "--datasets",
            "ae_attendances",
            "--dry-run",
            "--tools-dir",
            tools.to_str().unwrap(),
        ],
        &[("PATH", "/usr/bin:/bin")],
    );
    run.expect_code(0);
    let want: PathBuf = tools.join("url_to_manifest");
    assert!(
        run.stdout().contains(&format!("({})", want.display())),
        "{}",
        run.context()
    );
}

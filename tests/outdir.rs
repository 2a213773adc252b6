//! Output directories are owned (issue 14, item 3): a run holds an advisory lock file in its
//! `--out` (`pid host`); a second run on the same directory is refused with one line naming the
//! holder, the lock of a process that no longer runs is taken over with a note, the lock is gone
//! after the run (success or error); `patch --resume` verifies the kept lines against their
//! checksums and refuses a changed or shortened file.

mod common;

use std::path::Path;

use common::{fixture, patchbay_cli};
use patchbay::io::{LOCK_FILE, sums_path};

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

/// A pid that ran on this host and has exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn ids(dir: &Path) -> String {
    let p = dir.join("ids.json");
    std::fs::write(&p, serde_json::to_vec(&common::random_prompts(5, &[4, 6, 5], 370, 3)).unwrap()).unwrap();
    p.display().to_string()
}

/// (command line without --out, files it writes) of several commands writing into --out.
fn commands(m: &str, ids: &str) -> Vec<(Vec<String>, &'static str)> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        (v(&["score", "--model", m, "--token-ids", ids, "--label-token-ids", "3,50,7", "--quiet"]), "scores.jsonl"),
        (v(&["patch", "--model", m, "--token-ids", ids, "--label-token-ids", "3,50,7", "--random-pairs", "4", "--sites", "resid_post", "--window", "1", "--quiet"]), "experiments.jsonl"),
        (v(&["generate", "--model", m, "--token-ids", ids, "--max-new-tokens", "2", "--quiet"]), "generations.jsonl"),
        (v(&["ablate", "--model", m, "--token-ids", ids, "--label-token-ids", "3,50,7", "--heads", "0.1,1.2", "--quiet"]), "manifest.json"),
    ]
}

#[test]
fn a_held_lock_refuses_every_command_and_a_stale_one_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("llama").display().to_string();
    let ids = ids(dir.path());
    for (i, (args, file)) in commands(&m, &ids).into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        std::fs::create_dir_all(&out).unwrap();
        let lock = out.join(LOCK_FILE);
        // Held by a live process (this test) on this host, or by a process on another host.
        for (holder, who) in [(format!("{} {}\n", std::process::id(), host()), format!("process {} on {}", std::process::id(), host())), ("1 elsewhere.example\n".to_string(), "process 1 on elsewhere.example".to_string())] {
            std::fs::write(&lock, &holder).unwrap();
            let (code, err) = patchbay_cli(&[args.iter().map(String::as_str).collect::<Vec<_>>(), vec!["--out", out.to_str().unwrap()]].concat());
            assert_eq!(code, 1, "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(&format!("is in use by {who} (lock file")), "{args:?}: {err}");
            assert!(!out.join(file).exists(), "{args:?} wrote {file} into a locked directory");
            assert_eq!(std::fs::read_to_string(&lock).unwrap(), holder, "the holder's lock is left alone");
        }
        // A killed run's lock on this host: taken over with a note, removed at the end.
        let dead = dead_pid();
        std::fs::write(&lock, format!("{dead} {}\n", host())).unwrap();
        let (code, err) = patchbay_cli(&[args.iter().map(String::as_str).collect::<Vec<_>>(), vec!["--out", out.to_str().unwrap()]].concat());
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(err.contains(&format!("was locked by process {dead}, which no longer runs; taking it over")), "{err}");
        assert!(out.join(file).exists());
        assert!(!lock.exists(), "{args:?} left its lock");
    }
}

#[test]
fn resume_refuses_changed_or_shortened_results_and_reruns_an_unsummed_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("llama").display().to_string();
    let ids = ids(dir.path());
    let run = |out: &Path, extra: &[&str]| {
        let base = ["patch", "--model", &m, "--token-ids", &ids, "--label-token-ids", "3,50,7", "--random-pairs", "6", "--sites", "resid_post,mlp_out", "--window", "1", "--quiet", "--out", out.to_str().unwrap()];
        patchbay_cli(&[&base[..], extra].concat())
    };
    let whole = dir.path().join("whole");
    assert_eq!(run(&whole, &[]).0, 0);
    let want = std::fs::read(whole.join("experiments.jsonl")).unwrap();
    assert!(!whole.join(LOCK_FILE).exists());
    type Tamper = fn(&Path);
    let cases: [(&str, Tamper, Option<&str>); 4] = [
        ("a number changed", |p| {
            let t = std::fs::read_to_string(p).unwrap();
            let i = t.find("\"logit_diff\":").unwrap() + 13;
            let mut b = t.into_bytes();
            b[i] = if b[i] == b'-' { b'1' } else { b'-' };
            std::fs::write(p, b).unwrap();
        }, Some("line 1 is not the line written")),
        ("a line removed", |p| {
            let t = std::fs::read_to_string(p).unwrap();
            std::fs::write(p, t.split_inclusive('\n').skip(1).collect::<String>()).unwrap();
        }, Some("is not the line written")),
        ("the last line removed", |p| {
            let t = std::fs::read_to_string(p).unwrap();
            let lines: Vec<&str> = t.split_inclusive('\n').collect();
            std::fs::write(p, lines[..lines.len() - 1].concat()).unwrap();
        }, Some("lines were removed")),
        ("killed between a line and its checksum", |p| {
            let s = sums_path(p);
            let t = std::fs::read_to_string(&s).unwrap();
            let lines: Vec<&str> = t.split_inclusive('\n').collect();
            std::fs::write(&s, lines[..lines.len() - 1].concat()).unwrap();
        }, None),
    ];
    for (i, (what, tamper, refused)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("killed{i}"));
        let (code, err) = run(&out, &["--stop-after", "5"]);
        assert_eq!(code, 1, "{err}");
        tamper(&out.join("experiments.jsonl"));
        let (code, err) = run(&out, &["--resume"]);
        match refused {
            Some(msg) => {
                assert_eq!(code, 1, "{what}: {err}");
                assert_eq!(err.lines().count(), 1, "{err}");
                assert!(err.contains(msg) && err.contains("cannot resume it"), "{what}: {err}");
                assert!(!out.join("summary.csv").exists());
            }
            None => {
                assert_eq!(code, 0, "{what}: {err}");
                assert_eq!(std::fs::read(out.join("experiments.jsonl")).unwrap(), want, "{what}: the resumed run's results");
                assert_eq!(std::fs::read(sums_path(&out.join("experiments.jsonl"))).unwrap(), std::fs::read(sums_path(&whole.join("experiments.jsonl"))).unwrap());
            }
        }
    }
}

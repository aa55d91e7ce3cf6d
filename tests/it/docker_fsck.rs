//! `stowage fsck` against Docker's own store: a private dockerd whose data
//! root the tests damage as a power cut does (a file truncated to 0, a layer
//! directory gone, every file of a layer zeroed, the engine's metadata
//! torn), then `fsck` must name the app, image, layer and file and exit
//! non-zero, and `fsck --repair` must restore the app from the blob store
//! with the registry stopped, leaving foreign images alone.

use std::path::{Path, PathBuf};

use crate::common::docker_device::*;
use crate::common::*;
use serde_json::Value;

/// The size of the file the user saw truncated.
const JOB_BYTES: usize = 2_000_000;

/// An app `NAME` of two services installed and running on a private
/// dockerd, its registry stopped. The worker's top layer (a `RUN`) holds
/// `/opt/job.bin` (copied up), a hard link to it, a whiteout and an opaque
/// directory.
struct Installed {
    _registry: Registry,
    local: LocalImages,
    work: tempfile::TempDir,
    dockerd: Option<PrivateDockerd>,
    device: Device,
    name: String,
    worker_local: String,
    /// The worker's local tag in the private engine.
    worker_tag: String,
}

impl Installed {
    fn new() -> Installed {
        let mut registry = Registry::start();
        let name = unique("dfsck");
        let host = registry.host();
        let mut local = LocalImages::default();
        let base = format!("{name}-base:1");
        local.busybox(&base);
        let worker_local = format!("{name}-worker:1");
        local.0.push(build_image(
            &worker_local,
            &base,
            &[
                ("/opt/job.bin", noise(7, JOB_BYTES)),
                ("/opt/extra.txt", b"extra\n".to_vec()),
                ("/srv/d/old.txt", b"old\n".to_vec()),
            ],
            "RUN rm /opt/extra.txt && ln /opt/job.bin /opt/job.link && rm -rf /srv/d && mkdir /srv/d && echo new > /srv/d/new.txt\nCMD [\"sleep\", \"3600\"]",
        ));
        let worker = format!("{host}/{name}/worker:1");
        let db = format!("{host}/{name}/db:1");
        push_image(&worker_local, &worker);
        push_image(&base, &db);
        let compose = format!(
            "services:\n  worker:\n    image: {worker}\n    network_mode: none\n  db:\n    image: {db}\n    network_mode: none\n    command: [\"sleep\", \"3600\"]\n"
        );
        let app = publish(&registry, &compose, &format!("{host}/{name}/{name}:1"));
        let work = temp_dir("docker-fsck-");
        let dockerd = PrivateDockerd::start(&work.path().join("docker"));
        let device = Device {
            root: work.path().join("root"),
            registry: host.clone(),
            docker_host: dockerd.host(),
            config: lenient_config(work.path()),
        };
        device.ok(&["pull", &app]);
        registry.stop();
        device.ok(&["run", &name]);
        let worker_tag = engine_images(&dockerd)
            .into_iter()
            .find(|t| t.contains("/worker:stowage-sha256-"))
            .expect("the worker's local tag");
        let installed = Installed {
            _registry: registry,
            local,
            work,
            dockerd: Some(dockerd),
            device,
            name,
            worker_local,
            worker_tag,
        };
        installed.assert_running();
        let clean = installed.device.json(&["fsck"]);
        assert_eq!(clean["clean"], true, "{clean:#}");
        installed
    }

    fn dockerd(&self) -> &PrivateDockerd {
        self.dockerd.as_ref().expect("the private dockerd runs")
    }

    /// The `diff` directory of the worker image's top layer.
    fn worker_upper_dir(&self) -> PathBuf {
        let dir = run_ok(self.dockerd().docker().args([
            "image",
            "inspect",
            "--format",
            "{{.GraphDriver.Data.UpperDir}}",
            &self.worker_tag,
        ]));
        PathBuf::from(dir.trim())
    }

    fn assert_running(&self) {
        let ps = self.device.json(&["ps"]);
        assert_eq!(app_state(&ps, &self.name)["state"], "running", "{ps:#}");
    }

    /// `fsck ARGS` fails; its JSON report and its text.
    fn fsck_fails(&self, args: &[&str]) -> (Value, String) {
        let mut full = vec!["--json", "fsck"];
        full.extend_from_slice(args);
        let out = run_fails(&mut self.device.stowage(&full));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(report["clean"], false, "{report:#}");
        let mut full = vec!["fsck"];
        full.extend_from_slice(args);
        let text = run_fails(&mut self.device.stowage(&full));
        (report, String::from_utf8_lossy(&text.stdout).into_owned())
    }

    /// The app's entry in an fsck report.
    fn app<'a>(&self, report: &'a Value) -> &'a Value {
        report["installed"]
            .as_array()
            .and_then(|apps| apps.iter().find(|a| a["name"] == self.name.as_str()))
            .unwrap_or_else(|| panic!("{} not in {report:#}", self.name))
    }

    /// `fsck --repair` with the registry stopped, then fsck (deep too) clean
    /// and the app running again.
    fn repair_and_check(&self, repair: &[&str]) {
        let report = self.device.json(repair);
        assert_eq!(report["clean"], true, "{report:#}");
        assert_eq!(self.app(&report)["repaired"], true, "{report:#}");
        for args in [&["fsck"][..], &["fsck", "--deep"][..]] {
            let again = self.device.json(args);
            assert_eq!(again["clean"], true, "{args:?}: {again:#}");
        }
        self.assert_running();
        let job = self.worker_upper_dir().join("opt/job.bin");
        assert_eq!(
            std::fs::metadata(&job).map(|m| m.len()).ok(),
            Some(JOB_BYTES as u64),
            "{}",
            job.display()
        );
    }
}

/// The damaged files fsck lists for the app, as "path" strings.
fn damaged_files(app: &Value) -> Vec<String> {
    app["damaged_images"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["layers"].as_array().cloned().unwrap_or_default())
        .flat_map(|l| l["files"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f["path"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_truncated_layer_file_is_named_and_restored_offline_and_the_app_runs_again() {
    let app = Installed::new();
    let job = app.worker_upper_dir().join("opt/job.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&job)
        .and_then(|f| f.set_len(0))
        .unwrap_or_else(|e| panic!("truncate {}: {e}", job.display()));

    let (report, text) = app.fsck_fails(&[]);
    let entry = app.app(&report);
    let images = entry["damaged_images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{report:#}");
    assert_eq!(images[0]["tag"], app.worker_tag.as_str(), "{report:#}");
    assert_eq!(images[0]["services"][0], "worker", "{report:#}");
    let files = damaged_files(entry);
    // The hard link shares the truncated inode.
    assert_eq!(files, ["opt/job.bin", "opt/job.link"], "{report:#}");
    let layer = &images[0]["layers"][0];
    assert!(layer["diff_id"].as_str().unwrap().starts_with("sha256:"));
    assert!(
        layer["files"][0]["problem"]
            .as_str()
            .unwrap()
            .contains(&format!("0 bytes, the layer has {JOB_BYTES}")),
        "{report:#}"
    );
    assert!(
        text.contains(&app.name) && text.contains("opt/job.bin") && text.contains("--repair"),
        "{text}"
    );

    app.repair_and_check(&["fsck", "--repair"]);
}

#[test]
fn a_removed_layer_directory_is_named_and_restored_offline() {
    let app = Installed::new();
    let layer_dir = app.worker_upper_dir();
    let layer_dir = layer_dir.parent().unwrap();
    std::fs::remove_dir_all(layer_dir)
        .unwrap_or_else(|e| panic!("remove {}: {e}", layer_dir.display()));

    let (report, text) = app.fsck_fails(&[]);
    let entry = app.app(&report);
    let image = &entry["damaged_images"][0];
    assert_eq!(image["tag"], app.worker_tag.as_str(), "{report:#}");
    // The engine cannot describe an image whose top layer is gone; the
    // layer database still names the directory.
    assert!(image["engine_error"].is_string(), "{report:#}");
    let layer = &image["layers"][0];
    assert!(
        layer["problem"].as_str().unwrap().contains("missing")
            && layer["dir"].as_str() == Some(&*layer_dir.join("diff").to_string_lossy()),
        "{report:#}"
    );
    assert!(
        text.contains(&app.name) && text.contains(&*layer_dir.to_string_lossy()),
        "{text}"
    );

    app.repair_and_check(&["fsck", "--repair"]);
}

#[test]
fn a_layer_zeroed_in_place_is_found_by_deep_and_restored() {
    let app = Installed::new();
    let upper = app.worker_upper_dir();
    let mut zeroed = 0;
    for relative in ["opt/job.bin", "srv/d/new.txt"] {
        let path = upper.join(relative);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        zeroed += 1;
    }
    assert_eq!(zeroed, 2);

    // Sizes are intact: the quick check cannot see it, the deep one does.
    let quick = app.device.json(&["fsck"]);
    assert_eq!(quick["clean"], true, "{quick:#}");
    let (report, text) = app.fsck_fails(&["--deep"]);
    let files = damaged_files(app.app(&report));
    assert_eq!(
        files,
        ["opt/job.bin", "opt/job.link", "srv/d/new.txt"],
        "{report:#}"
    );
    assert!(text.contains("content differs"), "{text}");

    app.repair_and_check(&["fsck", "--deep", "--repair"]);
    let content = std::fs::read(app.worker_upper_dir().join("opt/job.bin")).unwrap();
    assert_eq!(content, noise(7, JOB_BYTES));
}

#[test]
fn a_foreign_image_sharing_a_damaged_layer_is_reported_and_left_alone() {
    let mut app = Installed::new();
    // A user's image on top of the worker: it shares every worker layer.
    let user_local = format!("{}-user:1", app.name);
    app.local.build(
        &user_local,
        &app.worker_local,
        &[("/user.txt", b"mine".to_vec())],
    );
    let saved = run_ok_bytes(std::process::Command::new("docker").args(["save", &user_local]));
    run_ok_with_stdin(app.dockerd().docker().arg("load"), &saved);
    let user_id = run_ok(app.dockerd().docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &user_local,
    ]));

    let job = app.worker_upper_dir().join("opt/job.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&job)
        .and_then(|f| f.set_len(0))
        .unwrap();

    let (report, text) = app.fsck_fails(&["--repair"]);
    let entry = app.app(&report);
    assert_eq!(entry["repaired"], false, "{report:#}");
    let foreign = entry["foreign"].as_array().unwrap();
    assert!(
        foreign
            .iter()
            .any(|f| f.as_str().unwrap().contains(&user_local)),
        "{report:#}"
    );
    assert!(
        text.contains(&user_local) && text.contains("left alone"),
        "{text}"
    );
    // Neither the foreign image nor stowage's was removed.
    let after = run_ok(app.dockerd().docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &user_local,
    ]));
    assert_eq!(after, user_id);
    assert!(engine_images(app.dockerd()).contains(&app.worker_tag));
    app.assert_running();

    // Once the user removes their image, the repair goes through.
    run_ok(app.dockerd().docker().args(["rmi", &user_local]));
    app.repair_and_check(&["fsck", "--repair"]);
}

/// Stops the private dockerd (as a power cut would), lets `damage` change
/// its data root, and starts it again if it can.
fn restart_after(app: &mut Installed, damage: impl FnOnce(&Path)) -> Result<(), String> {
    let data_root = app.dockerd().data_root().to_path_buf();
    drop(app.dockerd.take());
    damage(&data_root);
    let dockerd = PrivateDockerd::try_start(&data_root)?;
    app.device.docker_host = dockerd.host();
    app.dockerd = Some(dockerd);
    Ok(())
}

#[test]
fn a_torn_tag_store_that_keeps_dockerd_down_is_diagnosed_and_its_command_recovers_it() {
    let mut app = Installed::new();
    let tags = app
        .work
        .path()
        .join("docker/image/overlay2/repositories.json");
    let started = restart_after(&mut app, |_| {
        std::fs::write(&tags, b"").unwrap();
    });
    let why = started.expect_err("dockerd must not start on a torn tag store");
    assert!(why.contains("reference store"), "{why}");

    // The engine does not answer: fsck says what in its data root is why.
    app.device.docker_host = format!(
        "unix://{}",
        app.work.path().join("no-engine.sock").display()
    );
    let (report, text) = app.fsck_fails(&[]);
    let engine = &report["engine"][0];
    assert_eq!(engine["path"], &*tags.to_string_lossy(), "{report:#}");
    let recover = engine["recover"].as_str().unwrap();
    assert_eq!(
        recover,
        format!(
            "rm {} && systemctl restart docker && stowage fsck --repair",
            tags.display()
        )
    );
    assert!(text.contains("torn") && text.contains(recover), "{text}");

    // The command, step by step: rm, the engine started again (this test's
    // `systemctl restart docker`), the repair; then the app runs again.
    let rm = recover.split(" && ").next().unwrap();
    run_ok(std::process::Command::new("sh").args(["-c", rm]));
    let data_root = app.work.path().join("docker");
    let dockerd = PrivateDockerd::start(&data_root);
    app.device.docker_host = dockerd.host();
    app.dockerd = Some(dockerd);
    let report = app.device.json(&["fsck", "--repair"]);
    assert_eq!(report["clean"], true, "{report:#}");
    app.device.ok(&["run", &app.name]);
    app.assert_running();
    assert_eq!(app.device.json(&["fsck", "--deep"])["clean"], true);
}

#[test]
fn a_torn_layer_database_entry_is_named_with_the_command_that_recovers_it() {
    let mut app = Installed::new();
    // The worker's top layer's chain ID, from the engine's layer database.
    let upper = app.worker_upper_dir();
    let cache_id = upper
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let layerdb = app.work.path().join("docker/image/overlay2/layerdb/sha256");
    let entry = std::fs::read_dir(&layerdb)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p.join("cache-id")).is_ok_and(|c| c.trim() == cache_id))
        .expect("the layer's database entry");
    restart_after(&mut app, |_| {
        std::fs::write(entry.join("cache-id"), b"").unwrap();
    })
    .unwrap();

    let (report, text) = app.fsck_fails(&["--repair"]);
    let entry_text = entry.to_string_lossy();
    let error = app.app(&report)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let command = format!("rm -rf {entry_text} && stowage fsck --repair");
    assert!(error.contains(&command), "{report:#}");
    assert!(text.contains(&command), "{text}");

    // The command: rm -rf, then the repair; the app runs again.
    let rm = command.split(" && ").next().unwrap();
    run_ok(std::process::Command::new("sh").args(["-c", rm]));
    let report = app.device.json(&["fsck", "--repair"]);
    assert_eq!(report["clean"], true, "{report:#}");
    app.device.ok(&["run", &app.name]);
    app.assert_running();
    assert_eq!(app.device.json(&["fsck", "--deep"])["clean"], true);
}

#[test]
fn install_and_run_restore_a_damaged_image_before_they_go_on() {
    let app = Installed::new();
    let truncate = || {
        let job = app.worker_upper_dir().join("opt/job.bin");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&job)
            .and_then(|f| f.set_len(0))
            .unwrap_or_else(|e| panic!("truncate {}: {e}", job.display()));
    };
    let job_size = || {
        std::fs::metadata(app.worker_upper_dir().join("opt/job.bin"))
            .map(|m| m.len())
            .ok()
    };

    // install: the running app's damaged image is reloaded, the app started again.
    truncate();
    let out = run_ok(&mut app.device.stowage(&["install", &app.name]));
    assert_eq!(job_size(), Some(JOB_BYTES as u64), "{out}");
    app.assert_running();
    assert_eq!(app.device.json(&["fsck", "--deep"])["clean"], true);

    // run, on a stopped app.
    app.device.ok(&["stop", &app.name]);
    truncate();
    app.device.ok(&["run", &app.name]);
    assert_eq!(job_size(), Some(JOB_BYTES as u64));
    app.assert_running();
    assert_eq!(app.device.json(&["fsck", "--deep"])["clean"], true);
}

/// The worker's local tags, dropped from the engine's tag store (what a
/// power cut during a load leaves: the tags are the load's last write).
fn drop_worker_tags(data_root: &Path) {
    let path = data_root.join("image/overlay2/repositories.json");
    let mut tags: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let repos = tags["Repositories"].as_object_mut().unwrap();
    let before = repos.len();
    repos.retain(|repo, _| !repo.ends_with("/worker"));
    assert_eq!(repos.len() + 1, before, "{path:?}");
    std::fs::write(&path, serde_json::to_vec(&tags).unwrap()).unwrap();
}

#[test]
fn a_torn_overlay2_lower_list_is_found_and_the_image_reloaded_even_untagged() {
    let mut app = Installed::new();
    // First with its tags kept, then with them lost too (the cut of the
    // power-cut test that left the device down).
    for lose_tags in [false, true] {
        // The reload of the first round gives the layer a new directory.
        let lower = app.worker_upper_dir().parent().unwrap().join("lower");
        let lower_copy = lower.clone();
        restart_after(&mut app, |data_root| {
            std::fs::write(&lower_copy, b"").unwrap();
            if lose_tags {
                drop_worker_tags(data_root);
            }
        })
        .unwrap();
        let (report, text) = app.fsck_fails(&[]);
        let damaged = &app.app(&report)["damaged_images"];
        let problems = damaged.to_string();
        assert!(
            problems.contains("lower-layer list") && problems.contains("is torn (0 bytes"),
            "lose_tags {lose_tags}: {report:#}"
        );
        assert!(text.contains(&*lower.to_string_lossy()), "{text}");

        let report = app.device.json(&["fsck", "--repair"]);
        assert_eq!(report["clean"], true, "lose_tags {lose_tags}: {report:#}");
        assert_eq!(app.app(&report)["repaired"], true, "{report:#}");
        app.device.ok(&["run", &app.name]);
        app.assert_running();
        assert_eq!(app.device.json(&["fsck", "--deep"])["clean"], true);
    }
}

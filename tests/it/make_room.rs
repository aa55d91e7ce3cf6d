//! When an update does not fit: the refusal lists what could be freed, in
//! order of harm, and `--make-room` frees it, on a real loop-mounted ext4
//! volume holding the store, the apps and a private dockerd's data root:
//! - an update just over, with an app nobody needs in the store, is refused
//!   with the plan (prune would make it fit); `--make-room=prune` frees it
//!   and the update succeeds, the running app untouched until the switch;
//! - an update that fits only by dropping the rollback copy is refused
//!   without the flag and with `prune`, succeeds with `drop-rollback`, and
//!   `status` then says that no rollback copy exists;
//! - an update that fits only once an app the target drops goes is refused
//!   the same way, and with `drop-rollback` that app stops and goes first.

use std::process::Command;

use crate::common::docker_device::*;
use crate::common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Versions of app `shop` (one service on a base of its own, shared by
/// every version), each with a layer of `noise_mib` MiB of its own.
struct Shop {
    registry: Registry,
    local: LocalImages,
    name: String,
    base: String,
    seed: u64,
}

impl Shop {
    fn new() -> Shop {
        let name = unique("room");
        let base = format!("{name}-base:1");
        let mut local = LocalImages::default();
        local.0.push(busybox_image_of_its_own(&base));
        Shop {
            registry: Registry::start(),
            local,
            name,
            base,
            seed: test_seed(),
        }
    }

    /// Version `v` of app `app`: its pinned reference.
    fn publish(&mut self, app: &str, v: u64, noise_mib: usize) -> String {
        let host = self.registry.host();
        let local = format!("{}-{app}-web:{v}", self.name);
        let base = self.base.clone();
        self.local.build(
            &local,
            &base,
            &[("/srv/web.bin", noise(self.seed + v, noise_mib << 20))],
        );
        let remote = format!("{host}/{}/{app}-web:{v}", self.name);
        push_image(&local, &remote);
        publish(
            &self.registry,
            &format!("services:\n  web:\n    image: {remote}\n    network_mode: none\n"),
            &format!("{host}/{}/{app}:{v}", self.name),
        )
    }
}

/// A device whose store, apps and Docker share one volume.
fn device_on(volume: &LoopVolume, registry: &Registry, dockerd: &PrivateDockerd) -> Device {
    let config = volume.path().join("stowage.toml");
    std::fs::write(&config, "watermark = 99\n").unwrap();
    Device {
        root: volume.path().join("root"),
        registry: registry.host(),
        docker_host: dockerd.host(),
        config: Some(config),
    }
}

/// The check's figures for the one volume: (peak required, reserve).
fn peak_and_reserve(device: &Device, app: &str) -> (u64, u64) {
    let check = device.json(&["check", app]);
    let v = &check["volumes"][0];
    assert_eq!(check["volumes"].as_array().unwrap().len(), 1, "{check}");
    (
        v["required"].as_u64().unwrap(),
        v["reserved"].as_u64().unwrap(),
    )
}

/// Makes the volume have `available` bytes above the policy's reserve by
/// (re)writing `filler`.
fn leave_available(volume: &LoopVolume, filler: &std::path::Path, reserve: u64, available: u64) {
    let _ = std::fs::remove_file(filler);
    let free = volume.synced_stats().available_bytes();
    let fill = free
        .checked_sub(reserve + available)
        .unwrap_or_else(|| panic!("only {free} bytes free, {available} wanted"));
    run_ok(
        Command::new("fallocate")
            .args(["-l", &fill.to_string()])
            .arg(filler),
    );
    volume.synced_stats();
}

/// `stowage --json update ...`: the exit code and every JSON value it
/// printed (event lines, the refusal's report, the result line).
fn update_json(device: &Device, args: &[&str]) -> (Option<i32>, Vec<Value>) {
    let mut full = vec!["--json", "update"];
    full.extend_from_slice(args);
    let out = run_output(&mut device.stowage(&full));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let values: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {}", say(&out)));
    eprintln!("update {args:?}: {}", say(&out));
    (out.status.code(), values)
}

/// The refusal's plan to make room.
fn plan_of(values: &[Value]) -> &Value {
    values
        .iter()
        .find_map(|v| v.get("make_room"))
        .unwrap_or_else(|| panic!("no plan in {values:?}"))
}

/// The plan's item `what`, if listed.
fn item<'a>(plan: &'a Value, what: &str) -> Option<&'a Value> {
    plan["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["what"] == what)
}

fn events(values: &[Value]) -> Vec<String> {
    values
        .iter()
        .filter_map(|v| v["event"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn an_update_just_over_is_refused_with_the_plan_and_make_room_prune_makes_it_fit() {
    let mut shop = Shop::new();
    let v1 = shop.publish("shop", 1, 8);
    let v2 = shop.publish("shop", 2, 8);
    let junk = shop.publish("junk", 1, 24);
    let volume = LoopVolume::new(512);
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    let device = device_on(&volume, &shop.registry, &dockerd);
    device.ok(&["update", &v1]);
    // An app pulled and never run: blobs no app needs (24 MiB of them).
    device.ok(&["pull", &junk]);

    let (peak, reserve) = peak_and_reserve(&device, &v2);
    let filler = volume.path().join("filler");
    leave_available(&volume, &filler, reserve, peak - 6 * MIB);
    let (code, values) = update_json(&device, &[&v2]);
    assert_eq!(code, Some(100));
    let plan = plan_of(&values);
    eprintln!("plan: {plan}");
    let unneeded = item(plan, "unneeded").unwrap_or_else(|| panic!("{plan}"));
    // The junk app's layer is 24 MiB, all of it on the one volume.
    assert!(unneeded["bytes"].as_u64().unwrap() >= 24 * MIB, "{plan}");
    assert_eq!(unneeded["volumes"].as_array().unwrap().len(), 1, "{plan}");
    // The rollback copy is listed (none yet: the device has none) after it.
    assert!(item(plan, "rollback_copy").is_none(), "{plan}");
    assert_eq!(plan["fits_after"], true, "{plan}");
    assert_eq!(plan["make_room"], "prune", "{plan}");
    let chosen = plan["free_first"].as_u64().unwrap() as usize;
    assert_eq!(plan["items"][chosen - 1]["what"], "unneeded", "{plan}");
    // Nothing was freed: the junk app is still stored, v1 still runs.
    assert!(device.ok(&["ls"]).contains("junk"));
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "shop")["state"], "running", "{ps}");
    // The human refusal lists it too.
    let out = run_output(&mut device.stowage(&["update", &v2]));
    assert_eq!(out.status.code(), Some(100), "{}", say(&out));
    let text = say(&out);
    eprintln!("the refusal, as people read it:\n{text}");
    assert!(
        text.contains("what could be freed, in order of harm"),
        "{text}"
    );
    assert!(text.contains("--make-room=prune"), "{text}");

    // With the flag: freed first, then installed while v1 runs, then the switch.
    let order = applied_freeing_first(&device, &["--make-room=prune", &v2]);
    assert!(at(&order, "installed") < at(&order, "stopped"), "{order:?}");
    assert!(!device.ok(&["ls"]).contains("junk"));
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "shop")["state"], "running", "{ps}");
    // prune keeps the rollback copy: v1 is it now.
    let status = device.ok(&["status"]);
    assert!(!status.contains("rollback copy: none"), "{status}");
    device.ok(&["stop", "--all"]);
}

/// Where event `e` came in `order`.
fn at(order: &[String], e: &str) -> usize {
    order
        .iter()
        .position(|x| x == e)
        .unwrap_or_else(|| panic!("{e}: {order:?}"))
}

/// `update ARGS` succeeds, freeing before it installs; its events in order.
fn applied_freeing_first(device: &Device, args: &[&str]) -> Vec<String> {
    let (code, values) = update_json(device, args);
    assert_eq!(code, Some(0), "{values:?}");
    let order = events(&values);
    assert!(at(&order, "freed") < at(&order, "installed"), "{order:?}");
    order
}

/// `update TARGET` is refused (exit 100), freeing nothing, without a flag
/// and with `--make-room=prune`: its plan lists `what` (at least
/// `min_bytes`, with a consequence saying `consequence`) and asks for
/// `drop-rollback`, which would make it fit.
fn refused_until_drop_rollback(
    device: &Device,
    target: &str,
    what: &str,
    min_bytes: u64,
    consequence: &str,
) {
    for flags in [&[][..], &["--make-room=prune"][..]] {
        let mut args = flags.to_vec();
        args.push(target);
        let (code, values) = update_json(device, &args);
        assert_eq!(code, Some(100), "{flags:?}");
        let plan = plan_of(&values);
        eprintln!("plan: {plan}");
        let listed = item(plan, what).unwrap_or_else(|| panic!("{plan}"));
        assert!(listed["bytes"].as_u64().unwrap() >= min_bytes, "{plan}");
        assert!(
            listed["consequence"]
                .as_str()
                .unwrap()
                .contains(consequence),
            "{plan}"
        );
        assert_eq!(plan["fits_after"], true, "{plan}");
        assert_eq!(plan["make_room"], "drop-rollback", "{plan}");
        assert!(
            !events(&values).contains(&"freed".to_string()),
            "{values:?}"
        );
    }
}

#[test]
fn an_update_that_fits_only_without_the_rollback_copy_needs_drop_rollback() {
    let mut shop = Shop::new();
    let v1 = shop.publish("shop", 1, 16);
    let v2 = shop.publish("shop", 2, 8);
    let v3 = shop.publish("shop", 3, 8);
    let volume = LoopVolume::new(512);
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    let device = device_on(&volume, &shop.registry, &dockerd);
    device.ok(&["update", &v1]);
    device.ok(&["update", &v2]);
    // v1 is the rollback copy: 16 MiB of blobs and as much in Docker.

    let (peak, reserve) = peak_and_reserve(&device, &v3);
    let filler = volume.path().join("filler");
    leave_available(&volume, &filler, reserve, peak - 12 * MIB);
    refused_until_drop_rollback(
        &device,
        &v3,
        "rollback_copy",
        16 * MIB,
        "no rollback for this update",
    );
    let status = device.ok(&["status"]);
    assert!(!status.contains("rollback copy: none"), "{status}");

    let (code, values) = update_json(&device, &["--make-room=drop-rollback", &v3]);
    assert_eq!(code, Some(0), "{values:?}");
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "shop")["state"], "running", "{ps}");
    let status = device.ok(&["status"]);
    assert!(status.contains("rollback copy: none"), "{status}");
    device.ok(&["stop", "--all"]);
}

#[test]
fn the_agent_takes_make_room_from_the_config_file() {
    let mut shop = Shop::new();
    let v1 = shop.publish("shop", 1, 8);
    let v2 = shop.publish("shop", 2, 8);
    let junk = shop.publish("junk", 1, 24);
    let volume = LoopVolume::new(512);
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    let device = device_on(&volume, &shop.registry, &dockerd);
    let config = device.config.clone().unwrap();
    let target = format!("{}/{}/fleet:main", shop.registry.host(), shop.name);
    let agent_once = || {
        run_output(&mut device.stowage(&[
            "agent",
            "--target",
            &target,
            "--once",
            "--interval",
            "1s",
            "--verify-timeout",
            "60",
        ]))
    };
    device.json(&["target", "publish", &target, &v1]);
    let out = agent_once();
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    device.ok(&["pull", &junk]);

    device.json(&["target", "publish", &target, &v2]);
    let (peak, reserve) = peak_and_reserve(&device, &v2);
    leave_available(
        &volume,
        &volume.path().join("filler"),
        reserve,
        peak - 6 * MIB,
    );
    // No make_room in the config: refused, then waiting, nothing freed.
    for expected in ["refused", "waiting_for_space"] {
        let out = agent_once();
        assert_eq!(out.status.code(), Some(100), "{}", say(&out));
        let status = device.json(&["status"]);
        assert_eq!(status["last_result"], expected, "{status}");
        assert!(device.ok(&["ls"]).contains("junk"));
    }
    // With it: the waiting target is applied, making room first.
    std::fs::write(&config, "watermark = 99\nmake_room = \"prune\"\n").unwrap();
    let out = agent_once();
    assert_eq!(out.status.code(), Some(0), "{}", say(&out));
    let status = device.json(&["status"]);
    assert_eq!(status["last_result"], "committed", "{status}");
    assert!(!device.ok(&["ls"]).contains("junk"));
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "shop")["state"], "running", "{ps}");
    device.ok(&["stop", "--all"]);
}

#[test]
fn an_update_that_fits_only_once_a_dropped_app_goes_stops_it_first_with_drop_rollback() {
    let mut shop = Shop::new();
    let v1 = shop.publish("shop", 1, 8);
    let v2 = shop.publish("shop", 2, 8);
    let extra = shop.publish("extra", 1, 24);
    let volume = LoopVolume::new(512);
    let dockerd = PrivateDockerd::start(&volume.path().join("docker"));
    let device = device_on(&volume, &shop.registry, &dockerd);
    device.ok(&["update", &v1, &extra]);
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "extra")["state"], "running", "{ps}");

    // The target drops `extra` (24 MiB in the store and as much in Docker):
    // only its going makes room for v2.
    let (peak, reserve) = peak_and_reserve(&device, &v2);
    let filler = volume.path().join("filler");
    leave_available(&volume, &filler, reserve, peak - 12 * MIB);
    refused_until_drop_rollback(
        &device,
        &v2,
        "dropped_apps",
        24 * MIB,
        "stop before the update",
    );
    // Nothing was touched: both apps still run.
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "extra")["state"], "running", "{ps}");
    assert_eq!(app_state(&ps, "shop")["state"], "running", "{ps}");

    applied_freeing_first(&device, &["--make-room=drop-rollback", &v2]);
    let ps = device.json(&["ps"]);
    assert_eq!(app_state(&ps, "shop")["state"], "running", "{ps}");
    assert!(
        ps.as_array()
            .is_some_and(|apps| apps.iter().all(|a| a["name"] != "extra")),
        "{ps}"
    );
    assert!(!device.ok(&["ls"]).contains("extra"));
    let status = device.ok(&["status"]);
    assert!(!status.contains("extra"), "{status}");
    device.ok(&["stop", "--all"]);
}

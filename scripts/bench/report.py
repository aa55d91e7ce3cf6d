#!/usr/bin/env python3
"""Turns scripts/bench.sh's measurements into a Markdown report.

  report.py --results FILE --publish-app JSON --pull-app JSON --install 0|1
      prints the report (machine, apps, table, targets) on stdout
  report.py --splice DOC < REPORT
      replaces what lies between the results markers of DOC with REPORT
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"
MIB = 1024 * 1024


def sh(*cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        return out.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    debian = open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else "?"
    fs = sh("stat", "-f", "-c", "%T", "/var/tmp")
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_kib / MIB:.0f} GiB RAM, "
        f"Linux {platform.release()}, Debian {debian}; work dir on {fs} (/var/tmp); "
        f"shared with other jobs, so figures are noisy. "
        f"{sh('skopeo', '--version')}; docker-registry {sh('docker-registry', '--version').split()[-1] if sh('docker-registry', '--version') != '?' else '?'}; "
        f"dockerd {sh('docker', 'version', '--format', '{{.Server.Version}}')}"
    )


def app_line(name, path):
    with open(path) as f:
        app = json.load(f)
    parts = []
    for arch, a in app["architectures"].items():
        parts.append(
            f"{a['layers']} layers, {a['download_size'] / 1e6:.0f} MB to download (gzip), "
            f"{a['usage'] / 1e6:.0f} MB unpacked ({arch})"
        )
    return f"- {name}: {len(app['services'])} services; " + "; ".join(parts)


def fmt_s(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_kib(k):
    return f"{k / 1024:.1f} MiB"


def report(args):
    runs = {}
    order = []
    with open(args.results) as f:
        for line in f:
            r = json.loads(line)
            if r["case"] not in runs:
                order.append(r["case"])
            runs.setdefault(r["case"], []).append(r)

    def median(case):
        return statistics.median(r["wall_s"] for r in runs[case])

    # Each comparison row is set against the stowage row of its section
    # (the text before the first ": ").
    def reference_of(case):
        section = case.split(": ", 1)[0]
        for candidate in (f"{section}: stowage pull", f"{section}: stowage install"):
            if candidate in runs and candidate != case:
                return candidate
        return None
    out = []
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out.append(f"### Run of {now} (stowage {args.stowage_commit})\n")
    out.append(f"Machine: {machine()}.\n")
    if args.publish_app:
        out.append(app_line("publish app", args.publish_app))
    out.append(app_line("pull app", args.pull_app))
    if args.files_app:
        out.append(app_line("files app (install only)", args.files_app))
    out.append("")
    out.append(
        "| case | runs | wall, median | min - max | time vs stowage | peak RSS (max) "
        "| dockerd RSS growth | peak extra disk |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in order:
        rs = runs[case]
        walls = [r["wall_s"] for r in rs]
        ref = reference_of(case)
        ratio = ""
        if ref:
            ratio = f"{median(case) / median(ref):.2f}x"
        elif case.endswith((": stowage pull", ": stowage install")):
            ratio = "1.00x"
        dockerd = ""
        disk = ""
        if "dockerd_peak_kib" in rs[0]:
            dockerd = fmt_kib(max(r["dockerd_peak_kib"] for r in rs))
        if "disk_peak_bytes" in rs[0]:
            disk = f"{max(r['disk_peak_bytes'] for r in rs) / 1e6:.0f} MB"
        out.append(
            f"| {case} | {len(rs)} | {fmt_s(median(case))} | {fmt_s(min(walls))} - {fmt_s(max(walls))} "
            f"| {ratio} | {fmt_kib(max(r['maxrss_kib'] for r in rs))} | {dockerd} | {disk} |"
        )
    if not args.install:
        out.append(
            "| install: stowage install | - | skipped: this stowage has no `install` verb | | | | | |"
        )
    out.append("")
    out.append("Targets:\n")

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    def peak(case):
        return max(r["maxrss_kib"] for r in runs[case])

    for case in ("publish, cold cache", "publish, warm cache"):
        if case in runs:
            out.append(f"- {case}: peak RSS {fmt_kib(peak(case))} < 64 MiB: {verdict(peak(case) < 64 * 1024)}")
    if "pull: stowage pull" in runs:
        s = median("pull: stowage pull")
        for other in ("pull: skopeo copy, 3 images one by one", "pull: skopeo copy, 3 images at once"):
            if other in runs:
                r = median(other) / s
                out.append(
                    f"- stowage pull >= 2x faster than {other[6:]}: {r:.2f}x: {verdict(r >= 2)}"
                )
        p = peak("pull: stowage pull")
        out.append(f"- stowage pull peak RSS {fmt_kib(p)} < 40 MiB: {verdict(p < 40 * 1024)}")
    if "check: store of 10,000 blobs" in runs:
        m = median("check: store of 10,000 blobs")
        out.append(
            f"- stowage check on a store of 10,000 blobs {fmt_s(m)} (median, whole process, "
            f"registry and Docker queries included) < 50 ms: {verdict(m < 0.05)}"
        )
    def disk(case):
        return max(r["disk_peak_bytes"] for r in runs[case])

    sections = []
    for case in order:
        section = case.split(": ", 1)[0]
        if section.startswith("install") and section not in sections:
            sections.append(section)
    for section in sections:
        mine = f"{section}: stowage install"
        if not (args.install and mine in runs):
            continue
        for way in ("docker pull, 3 images one by one", "docker pull, 3 images at once"):
            other = f"{section}: {way}"
            if other in runs:
                r = median(other) / median(mine)
                out.append(
                    f"- {mine} >= 2x faster than {way}: {r:.2f}x: {verdict(r >= 2)}"
                )
        pulled = f"{section}: docker pull, 3 images one by one"
        if pulled in runs:
            for case in (mine, f"{section}: stowage install, space short"):
                if case in runs:
                    out.append(
                        f"- {case}: peak extra disk {disk(case) / 1e6:.0f} MB <= docker pull's "
                        f"({disk(pulled) / 1e6:.0f} MB, one by one): {verdict(disk(case) <= disk(pulled))}"
                    )
        out.append(f"- {mine}: peak RSS {fmt_kib(peak(mine))} < 48 MiB: {verdict(peak(mine) < 48 * 1024)}")
        before = [c for c in order if c.startswith(f"{section}: stowage install, before")]
        for b in before:
            r = median(mine) / median(b)
            out.append(
                f"- {mine} no slower than {b.split(': ', 1)[1]}: {fmt_s(median(mine))} against "
                f"{fmt_s(median(b))} ({r:.2f}x): {verdict(r <= 1.0)}"
            )
    if not args.install:
        out.append("- stowage install >= 2x faster than docker pull: not measured (no `install` verb yet)")
    out.extend(flash_wear(args, runs, sections))
    return "\n".join(out) + "\n"


def flash_wear(args, runs, sections):
    """Bytes written onto the device per byte of app (its layers as
    published, gzip), each way from the registry into the engine: the
    tools' own writes (rusage) plus the engine volume's (its loop device)."""

    def written(case, field):
        rs = runs.get(case)
        if not rs or field not in rs[0]:
            return None
        return statistics.median(r[field] for r in rs)

    rows = []
    for section in sections:
        app_path = args.files_app if "files app" in section else args.pull_app
        with open(app_path) as f:
            app = json.load(f)
        app_bytes = sum(a["download_size"] for a in app["architectures"].values())
        ways = []
        pull = written(f"{section}: stowage pull into its store", "written_bytes")
        install_own = written(f"{section}: stowage install", "written_bytes")
        install_engine = written(f"{section}: stowage install", "volume_written_bytes")
        if None not in (pull, install_own, install_engine):
            ways.append(("stowage pull + install", pull + install_own, install_engine))
        docker_pull = written(f"{section}: docker pull, 3 images one by one", "volume_written_bytes")
        if docker_pull is not None:
            ways.append(("docker pull, one by one", 0, docker_pull))
        skopeo = written(f"{section}: skopeo copy to docker-archives, 3 images one by one", "written_bytes")
        load = written(f"{section}: docker load of skopeo's archives", "volume_written_bytes")
        if None not in (skopeo, load):
            ways.append(("skopeo copy to docker-archives + docker load", skopeo, load))
        for way, own, engine in ways:
            total = own + engine
            rows.append(
                f"| {section} | {way} | {own / 1e6:.0f} MB | {engine / 1e6:.0f} MB "
                f"| {total / 1e6:.0f} MB | {total / app_bytes:.2f} |"
            )
    if not rows:
        return []
    return [
        "",
        "Flash wear (bytes written onto the device, medians; per byte of the app's layers as published, gzip):",
        "",
        "| section | way | the tool's own writes | the engine volume's writes | total | per byte of app |",
        "|---|---|---:|---:|---:|---:|",
    ] + rows


def splice(doc):
    body = sys.stdin.read()
    with open(doc) as f:
        text = f.read()
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END)
    text = text[:start] + "\n" + body + text[end:]
    with open(doc + ".tmp", "w") as f:
        f.write(text)
    os.replace(doc + ".tmp", doc)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--results")
    parser.add_argument("--publish-app")
    parser.add_argument("--pull-app")
    parser.add_argument("--files-app")
    parser.add_argument("--install", type=int, default=0)
    parser.add_argument("--stowage-commit", default="?")
    parser.add_argument("--splice")
    args = parser.parse_args()
    if args.splice:
        splice(args.splice)
    else:
        sys.stdout.write(report(args))


if __name__ == "__main__":
    main()

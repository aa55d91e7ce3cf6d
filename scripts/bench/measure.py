#!/usr/bin/env python3
"""Runs one command and measures it, for scripts/bench.sh.

Prints one JSON object on stdout:
  wall_s            wall-clock seconds from spawn to exit
  maxrss_kib        peak resident set of the command (and of its largest
                    descendant), from wait4's rusage as GNU time reports it:
                    the command runs under /usr/bin/time, because a child
                    forked from this Python keeps Python's high-water mark
                    (about 14 MiB) through exec
  dockerd_peak_kib  peak growth of dockerd's resident set over its value at
                    the start (only with --dockerd-pid): for `docker pull` and
                    `docker load` the work happens in the engine, not the client
  cpu_s             user plus system CPU seconds of the command and its
                    waited-for descendants (wait4's rusage)
  dockerd_cpu_s     CPU seconds dockerd and the children it reaped (unpigz,
                    its untar helpers) spent meanwhile (only with
                    --dockerd-pid; /proc/PID/stat)
  disk_peak_bytes   peak growth of the used bytes of the file system holding
                    --disk PATH over its value at the start, polled by statvfs
  disk_end_bytes    that growth once the command ended
  written_bytes     bytes the command (and its waited-for descendants) wrote
                    to file systems, from wait4's rusage (ru_oublock, counted
                    when pages are dirtied): its own flash wear
  volume_written_bytes  bytes written to the block device --written-dev
                    (e.g. loop3) from before the command to after a sync once
                    it ended (/sys/block/DEV/stat): whatever wrote them, the
                    engine included
The command's stdout and stderr go to --log (default /dev/null). A non-zero
exit makes this exit non-zero too, after printing the JSON (with "rc").
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

POLL_S = 0.005


def used_bytes(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def sectors_written(dev):
    with open(f"/sys/block/{dev}/stat") as f:
        return int(f.read().split()[6])


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime: fields 14-17, counted from 3 here.
        return sum(int(x) for x in fields[11:15])
    except (OSError, IndexError, ValueError):
        return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--disk", help="a path on the file system to watch")
    parser.add_argument("--dockerd-pid", type=int, help="dockerd's pid, to watch its RSS")
    parser.add_argument("--written-dev", help="a block device (sysfs name) whose writes to count")
    parser.add_argument("--log", default="/dev/null")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    if args.written_dev:
        os.sync()
        written0 = sectors_written(args.written_dev)
    disk0 = used_bytes(args.disk) if args.disk else 0
    dockerd0 = rss_kib(args.dockerd_pid) if args.dockerd_pid else 0
    dockerd_cpu0 = cpu_ticks(args.dockerd_pid) if args.dockerd_pid else 0
    peaks = {"disk": 0, "dockerd": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            if args.disk:
                peaks["disk"] = max(peaks["disk"], used_bytes(args.disk) - disk0)
            if args.dockerd_pid:
                peaks["dockerd"] = max(peaks["dockerd"], rss_kib(args.dockerd_pid) - dockerd0)
            time.sleep(POLL_S)

    poller = None
    if args.disk or args.dockerd_pid:
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
    gnu_time = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    rss_file = None
    if gnu_time:
        rss_fd, rss_file = tempfile.mkstemp(prefix="measure-rss.")
        os.close(rss_fd)
        command = [gnu_time, "-f", "%M", "-o", rss_file, *command]
    with open(args.log, "ab") as log:
        start = time.monotonic()
        child = subprocess.Popen(command, stdout=log, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.monotonic() - start
    maxrss = usage.ru_maxrss
    if rss_file:
        with open(rss_file) as f:
            lines = [line for line in f.read().splitlines() if line.strip().isdigit()]
        os.unlink(rss_file)
        if lines:
            maxrss = int(lines[-1])
    child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    if poller:
        poller.join()
    result = {
        "wall_s": round(wall, 4),
        "maxrss_kib": maxrss,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "written_bytes": usage.ru_oublock * 512,
        "rc": child.returncode,
    }
    if args.written_dev:
        os.sync()
        result["volume_written_bytes"] = (sectors_written(args.written_dev) - written0) * 512
    if args.dockerd_pid:
        result["dockerd_peak_kib"] = peaks["dockerd"]
        ticks = os.sysconf("SC_CLK_TCK")
        result["dockerd_cpu_s"] = round((cpu_ticks(args.dockerd_pid) - dockerd_cpu0) / ticks, 3)
    if args.disk:
        result["disk_peak_bytes"] = max(peaks["disk"], used_bytes(args.disk) - disk0)
        result["disk_end_bytes"] = used_bytes(args.disk) - disk0
    print(json.dumps(result))
    sys.exit(0 if child.returncode == 0 else 1)


if __name__ == "__main__":
    main()

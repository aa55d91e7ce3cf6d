//! `powercut-disk PLATTER MOUNT_POINT`: serves PLATTER as MOUNT_POINT/disk.img
//! with a volatile write cache until MOUNT_POINT is unmounted. Cut the power
//! with `echo 'cut MODE SEED' > MOUNT_POINT/ctl` (MODE: lose-all,
//! random-subset, torn-sectors); `cat MOUNT_POINT/ctl` shows what the disk
//! saw. For experiments by hand; the tests use the library in-process.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [platter, mount_point] = args.as_slice() else {
        eprintln!("usage: powercut-disk PLATTER MOUNT_POINT");
        return ExitCode::from(2);
    };
    let disk = match powercut_disk::Disk::mount(platter, mount_point) {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!("powercut-disk: cannot mount {}: {e}", mount_point.display());
            return ExitCode::FAILURE;
        }
    };
    println!(
        "serving {} as {}",
        platter.display(),
        disk.image().display()
    );
    match disk.wait() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("powercut-disk: {e}");
            ExitCode::FAILURE
        }
    }
}

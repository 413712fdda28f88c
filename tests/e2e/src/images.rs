//! The container images of the end-to-end tests, built on the host by `cargo xtask images`
//! (xtask/src/images.rs) into `target/images/` as OCI-layout tars.
//!
//! The names and file names here are a contract with that xtask command: an image
//! `<base name>:<tag>` is saved as `<file>` and imported with
//! `ctr -n k8s.io images import --base-name <base name> <file>`.

use std::path::{Path, PathBuf};

/// The sandbox ("pause") image: busybox sleeping until SIGTERM.
pub const PAUSE_IMAGE: &str = "localhost/vcan-pause:latest";

/// busybox applets in `/bin`, dash as `/bin/sh`, iproute2's `ip` (also `/bin/ip`) and can-utils
/// (`candump`, `cansend`, `cangen`, `canbusload`, ...).
pub const CANUTILS_IMAGE: &str = "localhost/vcan-canutils:latest";

/// The plugin as deploy/Dockerfile ships it (the debug build of `vcan-plugin` at
/// `/usr/local/bin/vcan-plugin`, its shared libraries, no shell; entrypoint the plugin, user 0):
/// what the DaemonSet runs.
pub const PLUGIN_IMAGE: &str = "localhost/vcan-plugin:dev";

/// Overrides the directory holding the image tars.
pub const IMAGES_DIR_ENV: &str = "VCAN_E2E_IMAGES";

/// An image tar to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArchive {
    /// The full reference the image has once imported, e.g. [`PAUSE_IMAGE`].
    pub reference: String,
    /// The name given to `ctr images import --base-name`: [`Self::reference`] without the tag.
    pub base_name: String,
    /// The OCI-layout tar.
    pub tar: PathBuf,
}

impl ImageArchive {
    /// The archive of `reference` (`name:tag`) saved as `file` in `dir`.
    pub fn new(reference: &str, dir: &Path, file: &str) -> Self {
        let base_name = reference
            .rsplit_once(':')
            .map_or(reference, |(name, _)| name)
            .to_string();
        Self {
            reference: reference.to_string(),
            base_name,
            tar: dir.join(file),
        }
    }
}

/// The test images ([`PAUSE_IMAGE`], [`CANUTILS_IMAGE`]), in [`images_dir`]: what every
/// containerd imports by default.
pub fn default_archives() -> Vec<ImageArchive> {
    let dir = images_dir();
    vec![
        ImageArchive::new(PAUSE_IMAGE, &dir, "vcan-pause.tar"),
        ImageArchive::new(CANUTILS_IMAGE, &dir, "vcan-canutils.tar"),
    ]
}

/// The plugin's image ([`PLUGIN_IMAGE`]) in [`images_dir`]. Not among [`default_archives`]:
/// only the tests that run the plugin from its image import it (add it to
/// `ContainerdOptions::images`), so the others neither pay for its import nor fail when the
/// plugin binary could not be built.
pub fn plugin_archive() -> ImageArchive {
    ImageArchive::new(PLUGIN_IMAGE, &images_dir(), "vcan-plugin.tar")
}

/// [`default_archives`] and [`plugin_archive`].
pub fn all_archives() -> Vec<ImageArchive> {
    let mut archives = default_archives();
    archives.push(plugin_archive());
    archives
}

/// Where the image tars are: `$VCAN_E2E_IMAGES` if set, else `images/` in the cargo target
/// directory this test binary was built in (found from the executable's path, so a
/// `CARGO_TARGET_DIR` elsewhere works too), else `target/images` of the workspace.
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(IMAGES_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(target) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(target_dir_of)
    {
        return target.join("images");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/images")
}

/// The cargo target directory containing `exe`: the nearest ancestor with cargo's
/// `CACHEDIR.TAG`.
fn target_dir_of(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_drop_the_tag_only() {
        let a = ImageArchive::new("localhost:5000/x/y:latest", Path::new("/d"), "y.tar");
        assert_eq!(a.base_name, "localhost:5000/x/y");
        assert_eq!(a.tar, Path::new("/d/y.tar"));
        let archives = default_archives();
        assert_eq!(archives[0].base_name, "localhost/vcan-pause");
        assert_eq!(archives[1].base_name, "localhost/vcan-canutils");
        let plugin = plugin_archive();
        assert_eq!(plugin.base_name, "localhost/vcan-plugin");
        assert_eq!(plugin.reference, PLUGIN_IMAGE);
        assert!(plugin.tar.ends_with("vcan-plugin.tar"));
        // The pause image stays first: containerd's sandbox_image is the first archive.
        assert_eq!(all_archives()[0], archives[0]);
    }

    #[test]
    fn the_images_are_found_in_this_target_directory() {
        // Test binaries live in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("current_exe");
        let target = target_dir_of(&exe).expect("a target directory above the test binary");
        assert!(exe.starts_with(&target));
    }
}

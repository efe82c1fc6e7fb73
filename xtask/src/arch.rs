//! The two architectures spliced is packaged and tested for, and what each needs: the Rust
//! targets, the cross tools' prefix, the QEMU system and Debian's names.
use std::process::Command;

/// A Debian architecture spliced is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Debian's name (`dpkg --print-architecture`).
    pub fn deb(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The glibc Rust target the package's binary is built for.
    pub fn gnu_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The static (musl) Rust target of the VM suite's guest binaries.
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// A binutils tool for this architecture's objects (`strip`, `objcopy`, `readelf`): the
    /// host's own on amd64, the `aarch64-linux-gnu-` cross one on arm64.
    pub fn tool(self, name: &str) -> Command {
        match self {
            Arch::Amd64 => Command::new(name),
            Arch::Arm64 => Command::new(format!("aarch64-linux-gnu-{name}")),
        }
    }

    /// The environment cargo needs to link for this architecture from an amd64 host: the cross
    /// gcc as linker for both Rust targets (musl links with its self-contained C runtime).
    pub fn cargo_env(self) -> Vec<(String, String)> {
        match self {
            Arch::Amd64 => Vec::new(),
            Arch::Arm64 => ["AARCH64_UNKNOWN_LINUX_GNU", "AARCH64_UNKNOWN_LINUX_MUSL"]
                .iter()
                .map(|t| {
                    (
                        format!("CARGO_TARGET_{t}_LINKER"),
                        "aarch64-linux-gnu-gcc".to_string(),
                    )
                })
                .collect(),
        }
    }

    /// The Debian packages that cross-build for this architecture (none on amd64).
    pub fn cross_packages(self) -> &'static [&'static str] {
        match self {
            Arch::Amd64 => &[],
            Arch::Arm64 => &[
                "gcc-aarch64-linux-gnu",
                "libc6-dev-arm64-cross",
                "binutils-aarch64-linux-gnu",
            ],
        }
    }

    /// The QEMU system emulator for this architecture.
    pub fn qemu(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86_64",
            Arch::Arm64 => "qemu-system-aarch64",
        }
    }

    /// The Debian package holding [`Arch::qemu`].
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86",
            Arch::Arm64 => "qemu-system-arm",
        }
    }

    /// The machine, CPU and serial console arguments of a TCG guest.
    pub fn qemu_machine(self) -> (&'static [&'static str], &'static str) {
        match self {
            Arch::Amd64 => (&["-cpu", "max"], "ttyS0"),
            // `virt` with a GICv3 and a CPU that has every feature TCG emulates; the PL011 UART.
            // pauth-impdef: the architected QARMA pointer authentication is several times slower
            // to emulate than the implementation-defined one.
            Arch::Arm64 => (
                &[
                    "-machine",
                    "virt,gic-version=max",
                    "-cpu",
                    "max,pauth-impdef=on",
                ],
                "ttyAMA0",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn names() {
        assert_eq!(Arch::Arm64.deb(), "arm64");
        assert_eq!(Arch::Arm64.gnu_target(), "aarch64-unknown-linux-gnu");
        assert!(Arch::Amd64.cargo_env().is_empty());
        assert_eq!(
            Arch::Arm64.cargo_env()[0],
            (
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER".into(),
                "aarch64-linux-gnu-gcc".into()
            )
        );
    }
}

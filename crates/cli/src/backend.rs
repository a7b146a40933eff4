//! The VM the replay runs on.
//!
//! Invariant: the only place the CLI names a hypervisor implementation.

use clap::ValueEnum;
use core::fmt;

/// The hypervisor flavour to model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlavourArg {
    /// Linux KVM Book3S HV: compared with the recorded QEMU results after the
    /// documented guest-visible differences are masked.
    Kvm,
    /// QEMU TCG sPAPR: compared bit-exactly.
    Qemu,
}

impl fmt::Display for FlavourArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlavourArg::Kvm => "kvm",
            FlavourArg::Qemu => "qemu",
        })
    }
}

use revmap_sim::replay::{new_vm, Flavour, Vm, VmSpec};

impl From<FlavourArg> for Flavour {
    fn from(f: FlavourArg) -> Flavour {
        match f {
            FlavourArg::Kvm => Flavour::Kvm,
            FlavourArg::Qemu => Flavour::Qemu,
        }
    }
}

/// Creates the VM for one trace file.
pub fn make_vm(flavour: FlavourArg, spec: VmSpec) -> Result<Vm, revmap_sim::replay::HptError> {
    new_vm(flavour.into(), spec)
}

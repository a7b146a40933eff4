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

use revmap_sim::replay::{HcallResult, Hypervisor, ResultMask, VmSpec};

/// Placeholder until the HPT crate is merged.
pub enum Vm {}

impl Hypervisor for Vm {
    type Violation = String;
    fn hcall(&self, _: usize, _: u64, _: &[u64]) -> HcallResult {
        match *self {}
    }
    fn check_invariants(&self) -> Result<(), String> {
        match *self {}
    }
    fn result_masks(&self, _: u64, _: usize) -> &'static [ResultMask] {
        match *self {}
    }
}

/// Creates the VM for one trace file.
pub fn make_vm(_flavour: FlavourArg, _spec: VmSpec) -> Result<Vm, String> {
    Err("no HPT implementation linked yet".into())
}

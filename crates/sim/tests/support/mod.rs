//! Test support: a tiny plain model of QEMU's TCG HPT hypercalls (README "What this
//! hypervisor does"), used as an independent oracle for the replay engine and the
//! parser's register mapping. No validation beyond what the traces exercise.
#![allow(dead_code)]

use revmap_hpt::VcpuId;
use revmap_sim::replay::{HcallResult, ReplayTarget, ResultMask, VmSpec};
use revmap_testkit::port::SharedHcalls;
use std::cell::RefCell;

pub const H_AVPN: u64 = 0x8000_0000;
pub const H_ANDCOND: u64 = 0x4000_0000;
pub const H_READ_4: u64 = 0x20_0000_0000;

pub struct QemuModel {
    hpt: RefCell<Vec<(u64, u64)>>,
}

impl QemuModel {
    pub fn new(spec: VmSpec) -> Result<Self, String> {
        let n = 1usize << (spec.hpt_order - 4);
        Ok(QemuModel {
            hpt: RefCell::new(vec![(0x40, 0); n]),
        })
    }

    fn remove(&self, flags: u64, ptex: u64, avpn: u64) -> Result<(u64, u64), i64> {
        let mut hpt = self.hpt.borrow_mut();
        let e = hpt.get_mut(ptex as usize).ok_or(-4i64)?;
        let v = e.0;
        if v & 1 == 0
            || (flags & H_AVPN != 0 && v & !0x7f != avpn)
            || (flags & H_ANDCOND != 0 && v & avpn != 0)
        {
            return Err(-7);
        }
        let old = *e;
        *e = (0x40, 0);
        Ok(old)
    }
}

fn res(ret: i64, out: [u64; 8]) -> HcallResult {
    HcallResult { ret, out }
}

revmap_testkit::shared_hypercall_port!(QemuModel);

/// The model's hypercalls on the registers.
impl SharedHcalls for QemuModel {
    fn answer(&self, _vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        let r = self.call(opcode, regs);
        *regs = r.out;
        r.ret
    }
}

impl QemuModel {
    /// One hypercall of the model.
    fn call(&self, opcode: u64, a: &[u64]) -> HcallResult {
        let mut args = [0u64; 8];
        args[..a.len().min(8)].copy_from_slice(&a[..a.len().min(8)]);
        let [flags, ptex, x, y, ..] = args;
        let n = self.hpt.borrow().len() as u64;
        match opcode {
            0x08 => {
                if ptex >= n {
                    return res(-4, [0; 8]);
                }
                let mut hpt = self.hpt.borrow_mut();
                let g = (ptex & !7) as usize;
                match (g..g + 8).find(|&i| hpt[i].0 & 1 == 0) {
                    Some(i) => {
                        hpt[i] = ((x & !0x60) | 0x40, y);
                        res(0, [i as u64, 0, 0, 0, 0, 0, 0, 0])
                    }
                    None => res(-6, [0; 8]),
                }
            }
            0x04 => match self.remove(flags, ptex, x) {
                Ok((v, r)) => res(0, [v, r, 0, 0, 0, 0, 0, 0]),
                Err(rc) => res(rc, [0; 8]),
            },
            0x18 => {
                let mut hpt = self.hpt.borrow_mut();
                let Some(e) = hpt.get_mut(ptex as usize) else {
                    return res(-4, [0; 8]);
                };
                if e.0 & 1 == 0 || (flags & H_AVPN != 0 && e.0 & !0x7f != x) {
                    return res(-7, [0; 8]);
                }
                const PP0: u64 = 0x8000_0000_0000_0000;
                const KEY_HI: u64 = 0x3000_0000_0000_0000;
                const LOW: u64 = 0x3 | 0x4 | 0xe00;
                e.1 = (e.1 & !(PP0 | KEY_HI | LOW))
                    | ((flags << 55) & PP0)
                    | ((flags << 48) & KEY_HI)
                    | (flags & LOW);
                e.0 |= 0x40;
                res(0, [0; 8])
            }
            0x0c => {
                if ptex >= n {
                    return res(-4, [0; 8]);
                }
                let hpt = self.hpt.borrow();
                let mut out = [0; 8];
                if flags & H_READ_4 != 0 {
                    let b = (ptex & !3) as usize;
                    for i in 0..4 {
                        out[2 * i] = hpt[b + i].0;
                        out[2 * i + 1] = hpt[b + i].1;
                    }
                } else {
                    out[0] = hpt[ptex as usize].0;
                    out[1] = hpt[ptex as usize].1;
                }
                res(0, out)
            }
            0x124 => {
                let mut out = args;
                let mut ret = 0;
                for i in 0..4 {
                    let tsh = args[2 * i];
                    let tsl = args[2 * i + 1];
                    match tsh >> 62 {
                        3 => break,
                        1 => {}
                        _ => {
                            ret = -4;
                            break;
                        }
                    }
                    const KEEP: u64 = 0x03ff_ffff_ffff_ffff;
                    let mut rsp = (tsh & KEEP) | 0x8000_0000_0000_0000;
                    let f = tsh & 0x0300_0000_0000_0000;
                    let p = tsh & 0x00ff_ffff_ffff_ffff;
                    if f == 0x0300_0000_0000_0000 || p >= n {
                        out[2 * i] = rsp | 0x2000_0000_0000_0000;
                        ret = -4;
                        break;
                    }
                    match self.remove(f >> 26, p, tsl) {
                        Ok((_, r)) => rsp |= (r & 0x180) << 43,
                        Err(_) => rsp |= 0x1000_0000_0000_0000,
                    }
                    out[2 * i] = rsp;
                }
                res(ret, out)
            }
            _ => res(-2, [0; 8]),
        }
    }
}

impl ReplayTarget for QemuModel {
    type Violation = String;

    fn check_invariants(&self) -> Result<(), String> {
        Ok(())
    }

    fn result_masks(&self, _opcode: u64, _out_index: usize) -> &'static [ResultMask] {
        &[]
    }
}

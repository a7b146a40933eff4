//! An L1 builds a radix table for an L2, registers it in its partition table, and L0
//! resolves L2 accesses through it: the walk, the outcome L1 would see, and the shadow
//! leaf L0 would install.
//!
//! ```sh
//! cargo run -p revmap-nested --example l2_access
//! ```

use revmap_nested::access::{l1_translate, L1Layout, L2Outcome};
use revmap_nested::fault::{l0_leaf_for_l1, shadow_leaf, L0Leaf};
use revmap_nested::hcall::check_set_partition_table;
use revmap_nested::radix::{
    write_pate, Access, Geometry, PageSize, Pate, PateDw1, Ptcr, RadixBuilder, RadixPte,
    SparseMemory,
};
use revmap_nested::{NGpa, NestedGuests, ShadowLpidAllocator};
use revmap_rmap::{Gpa, Lpid};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const RAM: u64 = 4 << 30;
    let mut mem = SparseMemory::new(RAM);
    let layout = L1Layout {
        ram_bytes: RAM,
        l0_page_shift: 16,
    };

    // L1: a 64K-geometry table mapping 2 MiB of L2 memory read-write and one 64 KiB
    // page read-only without R (so the first access needs SET_RC).
    let mut b = RadixBuilder::new(&mut mem, Geometry::Base64K, 0x20_0000..0x40_0000)?;
    let rw = RadixPte::R | RadixPte::C | RadixPte::EAA_RW | RadixPte::EAA_READ;
    b.map(
        NGpa::new(0).ok_or("52-bit")?,
        Gpa(0x1000_0000),
        PageSize::P2M,
        rw,
    )?;
    b.map(
        NGpa::new(0x40_0000).ok_or("52-bit")?,
        Gpa(0x2000_0000),
        PageSize::P64K,
        RadixPte::EAA_READ,
    )?;
    let root = b.root();
    let ptcr = Ptcr(0x10_0000 | 4);
    check_set_partition_table(ptcr, |base| base.0 < RAM)?;
    write_pate(
        &mut mem,
        ptcr,
        7,
        Pate {
            dw0: root,
            dw1: PateDw1(0),
        },
    )?;

    // L0: H_ENTER_NESTED for LPID 7 creates the guest and caches its PATE.
    let mut guests = NestedGuests::new(ShadowLpidAllocator::new(4096));
    let id = guests.get(7, ptcr, true)?.ok_or("created")?;
    let pate = guests.update_ptbl_cache(id, &mem, ptcr)?;
    let shadow = guests.guest(id).ok_or("live")?.shadow_lpid();
    println!(
        "L2 7 runs as shadow LPID {}; root {:?}",
        shadow.raw(),
        pate.dw0
    );

    for (addr, acc) in [
        (0x1_2345, Access::Store),
        (0x40_0010, Access::Load),
        (0x40_0010, Access::Store),
        (0x80_0000, Access::Fetch),
    ] {
        let n = NGpa::new(addr).ok_or("52-bit")?;
        match l1_translate(&mem, pate.dw0, n, acc, layout) {
            L2Outcome::Complete(t) => {
                // L0 backs the L1 page with a 64 KiB host frame at a made-up address.
                let hpa = 0x7_0000_0000 + (t.raddr.0 & !0xffff);
                let l0 = L0Leaf {
                    pte: l0_leaf_for_l1(hpa, acc == Access::Store),
                    size: PageSize::P64K,
                };
                let s = shadow_leaf(l0, &t, n, acc, PageSize::P64K, Lpid(7))?;
                println!(
                    "{acc:?} {n}: L1 {} ({:?} leaf) -> shadow {:?} {:?} at {}, rmap key L1 {}",
                    t.raddr, t.size, s.size, s.pte, s.n_gpa, s.rmap_base
                );
            }
            other => println!("{acc:?} {n}: {other:?}"),
        }
    }
    guests.put(id)?;
    Ok(())
}

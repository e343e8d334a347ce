//! The eBPF object's stack, read off its instructions, against the rule of the oldest kernel
//! we support: the verifier adds up the frames of the deepest BPF-to-BPF call chain, each
//! rounded up to 32 bytes by 6.1 (to 8 by 6.12), and refuses a program whose chain passes
//! 512 bytes ("combined stack size of N calls is M. Too large"). Host-only: no kernel is asked, so this holds on every machine, and
//! `cargo xtask vm` shows the real verifiers agree.

use std::collections::{BTreeMap, HashMap};

use agent::datapath::EBPF_OBJECT;
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind, SymbolKind};

/// The kernel's limit for a whole call chain (MAX_BPF_STACK).
const MAX_STACK: u32 = 512;
/// 6.1 rounds every frame of a chain up to this.
const FRAME_ROUND: u32 = 32;
/// Room kept for the compiler's next register spill: a change that eats it fails here first.
const HEADROOM: u32 = 64;

const INSN: usize = 8;
const STACK_REG: u8 = 10;
const CLASS_MASK: u8 = 0x07;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_ALU: u8 = 0x04;
const CLASS_ALU64: u8 = 0x07;
const LD_IMM64: u8 = 0x18;
const MOV64_X: u8 = 0xbf;
const ADD64_K: u8 = 0x07;
const CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;

/// One function of the object: where it is and what its instructions show.
#[derive(Debug, Default)]
struct Frame {
    /// Deepest byte below r10 the function touches (directly, or through a pointer `r10 - N`
    /// passed on, e.g. a map key handed to a helper).
    depth: u32,
    /// Functions it calls (BPF-to-BPF), by name.
    calls: Vec<String>,
}

struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

fn decode(b: &[u8]) -> Insn {
    Insn {
        code: b[0],
        dst: b[1] & 0x0f,
        src: b[1] >> 4,
        off: i16::from_le_bytes([b[2], b[3]]),
        imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    }
}

/// The function a BPF-to-BPF call at instruction `i` enters. Within a section the immediate
/// is relative to the next instruction; across sections a relocation names the target's
/// section symbol and the immediate is relative to it.
fn callee(
    starts: &HashMap<(object::SectionIndex, usize), String>,
    relocs: &HashMap<usize, (object::SectionIndex, i64)>,
    section: object::SectionIndex,
    i: usize,
    insn: &Insn,
    caller: &str,
) -> String {
    let (section, base) = relocs.get(&i).copied().unwrap_or((section, i as i64));
    usize::try_from(base + i64::from(insn.imm) + 1)
        .ok()
        .and_then(|t| starts.get(&(section, t)))
        .unwrap_or_else(|| panic!("{caller}: the call at instruction {i} enters no function"))
        .clone()
}

fn below(off: i64) -> u32 {
    u32::try_from(-off.min(0)).expect("a stack offset fits u32")
}

/// Every function's frame and calls, keyed by symbol name.
fn frames(elf: &[u8]) -> BTreeMap<String, Frame> {
    let file = object::File::parse(elf).expect("parsing the eBPF object");
    // (section, instruction index) -> function starting there.
    let mut starts: HashMap<(object::SectionIndex, usize), String> = HashMap::new();
    let mut funcs = Vec::new();
    for sym in file.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let (Some(section), Ok(name)) = (sym.section_index(), sym.name()) else {
            continue;
        };
        let at = usize::try_from(sym.address()).expect("address fits usize") / INSN;
        starts.insert((section, at), name.to_owned());
        funcs.push((section, name.to_owned(), at, sym.size() as usize / INSN));
    }
    let mut out = BTreeMap::new();
    for (section_index, name, at, len) in funcs {
        let section = file
            .section_by_index(section_index)
            .expect("symbol's section");
        assert_eq!(
            section.kind(),
            SectionKind::Text,
            "{name} is not in a text section"
        );
        let code = section.data().expect("section data");
        // Calls across sections go through a relocation to the target's section symbol.
        let relocs: HashMap<usize, (object::SectionIndex, i64)> = section
            .relocations()
            .filter_map(|(offset, r)| match r.target() {
                RelocationTarget::Symbol(s) => {
                    let sym = file.symbol_by_index(s).ok()?;
                    let base = i64::try_from(sym.address()).ok()? / INSN as i64;
                    Some((offset as usize / INSN, (sym.section_index()?, base)))
                }
                _ => None,
            })
            .collect();
        let mut frame = Frame::default();
        // Registers holding `r10 - N`: what they reach counts as stack too.
        let mut from_r10 = [false; 11];
        let mut i = at;
        while i < at + len {
            let insn = decode(&code[i * INSN..(i + 1) * INSN]);
            let class = insn.code & CLASS_MASK;
            let dst = usize::from(insn.dst).min(10);
            match insn.code {
                LD_IMM64 => {
                    from_r10[dst] = false;
                    i += 2;
                    continue;
                }
                MOV64_X => from_r10[dst] = insn.src == STACK_REG,
                ADD64_K if from_r10[dst] => {
                    frame.depth = frame.depth.max(below(i64::from(insn.imm)));
                }
                CALL => {
                    if insn.src == PSEUDO_CALL {
                        frame
                            .calls
                            .push(callee(&starts, &relocs, section_index, i, &insn, &name));
                    }
                    // A call clobbers r0-r5.
                    from_r10[..=5].fill(false);
                }
                _ if class == CLASS_LDX && insn.src == STACK_REG => {
                    frame.depth = frame.depth.max(below(i64::from(insn.off)));
                    from_r10[dst] = false;
                }
                _ if (class == CLASS_ST || class == CLASS_STX) && insn.dst == STACK_REG => {
                    frame.depth = frame.depth.max(below(i64::from(insn.off)));
                }
                _ if matches!(class, CLASS_LDX | CLASS_ALU | CLASS_ALU64) => from_r10[dst] = false,
                _ => {}
            }
            i += 1;
        }
        out.insert(name, frame);
    }
    out
}

/// The deepest chain from `f`, frames rounded to `round`: bytes and the chain.
fn deepest(
    frames: &BTreeMap<String, Frame>,
    f: &str,
    round: u32,
    seen: &mut Vec<String>,
) -> (u32, Vec<String>) {
    let frame = &frames[f];
    assert!(
        !seen.iter().any(|s| s == f),
        "recursion through {f}: BPF forbids it"
    );
    seen.push(f.to_owned());
    let mut best = (0, Vec::new());
    for callee in &frame.calls {
        let below = deepest(frames, callee, round, seen);
        if below.0 > best.0 {
            best = below;
        }
    }
    seen.pop();
    let own = frame.depth.max(1).div_ceil(round) * round;
    let mut chain = vec![format!("{}({})", readable(f), frame.depth)];
    chain.extend(best.1);
    (own + best.0, chain)
}

/// `agent_ebpf::lb::track` out of a mangled `_RNvNtCs..._10agent_ebpf2lb5track`: the
/// identifiers (length-prefixed), without crate hashes.
fn readable(symbol: &str) -> String {
    if !symbol.starts_with("_R") {
        return symbol.to_owned();
    }
    let (bytes, mut parts, mut i) = (symbol.as_bytes(), Vec::new(), 0);
    while i < bytes.len() {
        let digits = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            i += 1;
            continue;
        }
        let n: usize = symbol[i..i + digits].parse().unwrap_or(0);
        let ident = symbol.get(i + digits..i + digits + n).unwrap_or("");
        if ident.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
            parts.push(ident);
        }
        i += digits + n.max(1);
    }
    parts.join("::")
}

#[test]
fn every_call_chain_fits_the_stack_of_6_1_with_headroom() {
    let frames = frames(EBPF_OBJECT);
    let entries: Vec<&String> = frames
        .keys()
        .filter(|name| name.starts_with("agent_"))
        .collect();
    assert!(entries.len() >= 8, "entry points found: {entries:?}");
    let mut over = Vec::new();
    for entry in entries {
        let (bytes, chain) = deepest(&frames, entry, FRAME_ROUND, &mut Vec::new());
        let (bytes8, _) = deepest(&frames, entry, 8, &mut Vec::new());
        println!(
            "{entry}: {bytes} bytes with frames rounded to {FRAME_ROUND} ({bytes8} rounded to 8): {}",
            chain.join(" -> ")
        );
        if bytes + HEADROOM > MAX_STACK {
            over.push(format!("{entry}: {bytes} bytes ({})", chain.join(" -> ")));
        }
    }
    assert!(
        over.is_empty(),
        "call chains over {} bytes ({MAX_STACK} less {HEADROOM} of headroom), frames rounded to \
         {FRAME_ROUND} as 6.1's verifier does: {over:?}",
        MAX_STACK - HEADROOM
    );
}

#[test]
fn the_analysis_sees_frames_and_calls() {
    // Guards the test above against reading nothing: the main programs call the parser, which
    // keeps state on the stack.
    let frames = frames(EBPF_OBJECT);
    let xdp = &frames["agent_xdp"];
    assert!(xdp.depth > 0, "agent_xdp shows no stack use: {xdp:?}");
    assert!(
        xdp.calls.iter().any(|c| c.contains("parse")),
        "agent_xdp calls no parser: {xdp:?}"
    );
}

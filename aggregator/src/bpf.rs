//! Filter expressions: libpcap compiles them, we run them.
//!
//! libpcap's compiler (`pcap_compile` through the `pcap` crate) is the only
//! way to get tcpdump's exact semantics for pcap-filter syntax, so we never
//! parse expressions ourselves. The classic-BPF program it emits is then
//! pre-decoded into `Op`s with absolute jump targets and validated once,
//! which lets the hot loops run without per-instruction decoding or target
//! checks. Packets one at a time go through a graph of closures
//! ([`Program::matches`]); packets in bulk go through a [`BatchRunner`],
//! which avoids branching on packet contents.

use std::fmt;
use std::sync::Arc;

/// Link-layer header types we compile for (values are DLT_* numbers).
pub const LINKTYPE_ETHERNET: u32 = 1;

/// A filter expression that libpcap rejected, with libpcap's own message.
#[derive(Debug, thiserror::Error)]
#[error("invalid filter expression {expr:?}: {message}")]
pub struct FilterError {
    pub expr: String,
    pub message: String,
}

/// One raw classic-BPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// What an [`Op`] does. Every combination the evaluator distinguishes is
/// its own code, so running an instruction costs one dispatch: the
/// branches that depend on packet contents are unpredictable, and each
/// extra level of dispatch behind them would be another misprediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    // Fused `ld <load>; [and #m;] j<cmp> #v`: A = load & m, then branch.
    JeqAbsB,
    JgtAbsB,
    JgeAbsB,
    JsetAbsB,
    JeqAbsH,
    JgtAbsH,
    JgeAbsH,
    JsetAbsH,
    JeqAbsW,
    JgtAbsW,
    JgeAbsW,
    JsetAbsW,
    JeqIndB,
    JgtIndB,
    JgeIndB,
    JsetIndB,
    JeqIndH,
    JgtIndH,
    JgeIndH,
    JsetIndH,
    JeqIndW,
    JgtIndW,
    JgeIndW,
    JsetIndW,
    LdAbsB,
    LdAbsH,
    LdAbsW,
    LdIndB,
    LdIndH,
    LdIndW,
    LdImm,
    LdLen,
    LdMem,
    LdxImm,
    LdxLen,
    LdxMem,
    LdxMsh,
    St,
    Stx,
    AddK,
    AddX,
    SubK,
    SubX,
    MulK,
    MulX,
    DivK,
    DivX,
    ModK,
    ModX,
    OrK,
    OrX,
    AndK,
    AndX,
    XorK,
    XorX,
    LshK,
    LshX,
    RshK,
    RshX,
    Neg,
    Ja,
    JeqK,
    JeqX,
    JgtK,
    JgtX,
    JgeK,
    JgeX,
    JsetK,
    JsetX,
    RetK,
    RetA,
    RetX,
    Tax,
    Txa,
}

/// A pre-decoded instruction. `k` is the instruction's constant (a packet
/// offset for loads, a scratch index for memory ops); fused compares also
/// use `m` (mask) and `v` (the constant compared against). Jump targets
/// are absolute indices.
#[derive(Debug, Clone, Copy)]
struct Op {
    code: Code,
    k: u32,
    m: u32,
    v: u32,
    jt: u32,
    jf: u32,
}

impl Op {
    fn new(code: Code, k: u32) -> Op {
        Op {
            code,
            k,
            m: u32::MAX,
            v: 0,
            jt: 0,
            jf: 0,
        }
    }

    fn jump(code: Code, k: u32, jt: usize, jf: usize) -> Op {
        Op {
            code,
            k,
            m: u32::MAX,
            v: k,
            jt: jt as u32,
            jf: jf as u32,
        }
    }
}
/// Why a raw program could not be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProgramError {
    #[error("empty program")]
    Empty,
    #[error("instruction {0}: unknown opcode {1:#06x}")]
    BadOpcode(usize, u16),
    #[error("instruction {0}: jump out of program")]
    BadJump(usize),
    #[error("instruction {0}: scratch memory index {1} out of range")]
    BadMem(usize, u32),
    #[error("program does not end with a return")]
    NoReturn,
}

/// A validated classic-BPF program ready to run.
#[derive(Clone)]
pub struct Program {
    ops: Box<[Op]>,
    /// The closure translation of `ops`, when the program is short enough.
    compiled: Option<Node>,
    raw: Vec<RawInsn>,
    /// `true` when the program accepts everything (empty expression), so the
    /// hot path can skip evaluation entirely.
    accept_all: bool,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("len", &self.ops.len())
            .finish()
    }
}

const BPF_MEMWORDS: u32 = 16;

impl Program {
    /// Compiles `expr` (tcpdump syntax) for `linktype` with libpcap, the way
    /// `tcpdump -r` does it (optimizer on, netmask unknown).
    pub fn compile(expr: &str, linktype: u32, snaplen: u32) -> Result<Self, FilterError> {
        let raw = compile_raw(expr, linktype, snaplen)?;
        Program::from_raw(&raw).map_err(|e| FilterError {
            expr: expr.to_string(),
            message: format!("libpcap produced a program we cannot run: {e}"),
        })
    }

    /// Loads and validates a raw program.
    pub fn from_raw(raw: &[RawInsn]) -> Result<Self, ProgramError> {
        use Code::*;
        if raw.is_empty() {
            return Err(ProgramError::Empty);
        }
        let n = raw.len();
        let mut ops = Vec::with_capacity(n);
        for (pc, ins) in raw.iter().enumerate() {
            let k = ins.k;
            let mem = |k: u32| {
                if k < BPF_MEMWORDS {
                    Ok(k)
                } else {
                    Err(ProgramError::BadMem(pc, k))
                }
            };
            // Relative jumps count from the next instruction.
            let target = |off: u64| -> Result<usize, ProgramError> {
                let t = pc as u64 + 1 + off;
                if t < n as u64 {
                    Ok(t as usize)
                } else {
                    Err(ProgramError::BadJump(pc))
                }
            };
            let code = ins.code;
            let bad = || ProgramError::BadOpcode(pc, code);
            // BPF_X selects the X register as the operand.
            let x = code & 0x08 != 0;
            let pick = |kc: Code, xc: Code| if x { xc } else { kc };
            let op = match code & 0x07 {
                // BPF_LD
                0x00 => match (code & 0xe0, code & 0x18) {
                    (0x00, 0x00) => Op::new(LdImm, k),
                    (0x20, 0x00) => Op::new(LdAbsW, k),
                    (0x20, 0x08) => Op::new(LdAbsH, k),
                    (0x20, 0x10) => Op::new(LdAbsB, k),
                    (0x40, 0x00) => Op::new(LdIndW, k),
                    (0x40, 0x08) => Op::new(LdIndH, k),
                    (0x40, 0x10) => Op::new(LdIndB, k),
                    (0x60, 0x00) => Op::new(LdMem, mem(k)?),
                    (0x80, 0x00) => Op::new(LdLen, k),
                    _ => return Err(bad()),
                },
                // BPF_LDX
                0x01 => match (code & 0xe0, code & 0x18) {
                    (0x00, 0x00) => Op::new(LdxImm, k),
                    (0x60, 0x00) => Op::new(LdxMem, mem(k)?),
                    (0x80, 0x00) => Op::new(LdxLen, k),
                    (0xa0, 0x10) => Op::new(LdxMsh, k),
                    _ => return Err(bad()),
                },
                0x02 => Op::new(St, mem(k)?),
                0x03 => Op::new(Stx, mem(k)?),
                // BPF_ALU
                0x04 => Op::new(
                    match code & 0xf0 {
                        0x00 => pick(AddK, AddX),
                        0x10 => pick(SubK, SubX),
                        0x20 => pick(MulK, MulX),
                        0x30 => pick(DivK, DivX),
                        0x40 => pick(OrK, OrX),
                        0x50 => pick(AndK, AndX),
                        0x60 => pick(LshK, LshX),
                        0x70 => pick(RshK, RshX),
                        0x80 => Neg,
                        0x90 => pick(ModK, ModX),
                        0xa0 => pick(XorK, XorX),
                        _ => return Err(bad()),
                    },
                    k,
                ),
                // BPF_JMP
                0x05 => match code & 0xf0 {
                    0x00 => {
                        let t = target(k as u64)?;
                        Op::jump(Ja, k, t, t)
                    }
                    0x10 => Op::jump(
                        pick(JeqK, JeqX),
                        k,
                        target(ins.jt as u64)?,
                        target(ins.jf as u64)?,
                    ),
                    0x20 => Op::jump(
                        pick(JgtK, JgtX),
                        k,
                        target(ins.jt as u64)?,
                        target(ins.jf as u64)?,
                    ),
                    0x30 => Op::jump(
                        pick(JgeK, JgeX),
                        k,
                        target(ins.jt as u64)?,
                        target(ins.jf as u64)?,
                    ),
                    0x40 => Op::jump(
                        pick(JsetK, JsetX),
                        k,
                        target(ins.jt as u64)?,
                        target(ins.jf as u64)?,
                    ),
                    _ => return Err(bad()),
                },
                // BPF_RET
                0x06 => match code & 0x18 {
                    0x00 => Op::new(RetK, k),
                    0x08 => Op::new(RetX, k),
                    0x10 => Op::new(RetA, k),
                    _ => return Err(bad()),
                },
                // BPF_MISC
                _ => match code & 0xf8 {
                    0x00 => Op::new(Tax, k),
                    0x80 => Op::new(Txa, k),
                    _ => return Err(bad()),
                },
            };
            ops.push(op);
        }
        // Every path must end in a return; since jumps only go forward, it is
        // enough that the last instruction is one.
        if !matches!(ops[n - 1].code, RetK | RetA | RetX) {
            return Err(ProgramError::NoReturn);
        }
        // Peephole: `ld <pkt>; [and #m;] j<cmp> #v` becomes one op. The
        // originals stay in place after it for anything that jumps into
        // the middle of the sequence.
        for i in 0..n {
            let Some(base) = load_index(ops[i].code) else {
                continue;
            };
            let (mask, j) = match ops.get(i + 1) {
                Some(o) if o.code == AndK => (o.k, i + 2),
                _ => (u32::MAX, i + 1),
            };
            let Some(jmp) = ops.get(j).copied() else {
                continue;
            };
            let cmp = match jmp.code {
                JeqK => 0,
                JgtK => 1,
                JgeK => 2,
                JsetK => 3,
                _ => continue,
            };
            ops[i] = Op {
                code: FUSED[base * 4 + cmp],
                k: ops[i].k,
                m: mask,
                v: jmp.k,
                jt: jmp.jt,
                jf: jmp.jf,
            };
        }
        let accept_all = ops[0].code == RetK && ops[0].k != 0;
        let compiled = compile_nodes(&ops);
        Ok(Program {
            compiled,
            ops: ops.into_boxed_slice(),
            raw: raw.to_vec(),
            accept_all,
        })
    }

    /// The raw instructions, as `tcpdump -ddd` would print them.
    pub fn raw(&self) -> &[RawInsn] {
        &self.raw
    }

    /// Runs the program over `pkt` (the captured bytes) with `wire_len` as
    /// the packet's length on the wire. Returns the program's return value:
    /// 0 rejects, anything else accepts.
    #[inline]
    pub fn run(&self, pkt: &[u8], wire_len: u32) -> u32 {
        if self.accept_all {
            return u32::MAX;
        }
        match &self.compiled {
            Some(entry) => entry(pkt, wire_len, 0, 0, &mut [0; BPF_MEMWORDS as usize]),
            None => self.interpret(pkt, wire_len),
        }
    }

    /// The reference evaluator: one dispatch per op.
    fn interpret(&self, pkt: &[u8], wire_len: u32) -> u32 {
        use Code::*;
        let ops = &*self.ops;
        let mut a: u32 = 0;
        let mut x: u32 = 0;
        let mut mem = [0u32; BPF_MEMWORDS as usize];
        let mut pc = 0usize;
        // A fused load-and-branch: a failed load rejects, as in libpcap.
        macro_rules! fused {
            ($op:expr, $load:ident, $off:expr, $cmp:ident) => {{
                let Some(val) = $load(pkt, $off) else {
                    return 0;
                };
                a = val & $op.m;
                pc = if $cmp(a, $op.v) { $op.jt } else { $op.jf } as usize;
            }};
        }
        macro_rules! load {
            ($load:ident, $off:expr) => {{
                match $load(pkt, $off) {
                    Some(v) => a = v,
                    None => return 0,
                }
            }};
        }
        macro_rules! branch {
            ($op:expr, $cmp:ident, $v:expr) => {{
                pc = if $cmp(a, $v) { $op.jt } else { $op.jf } as usize;
            }};
        }
        loop {
            // `from_raw` proved every target is in range and that the last
            // op returns, so `pc` never leaves the program; the bounds check
            // stays for safety and is always predicted.
            let op = ops[pc];
            pc += 1;
            let k = op.k;
            match op.code {
                JeqAbsB => fused!(op, ld_b, k as usize, eq),
                JgtAbsB => fused!(op, ld_b, k as usize, gt),
                JgeAbsB => fused!(op, ld_b, k as usize, ge),
                JsetAbsB => fused!(op, ld_b, k as usize, set),
                JeqAbsH => fused!(op, ld_h, k as usize, eq),
                JgtAbsH => fused!(op, ld_h, k as usize, gt),
                JgeAbsH => fused!(op, ld_h, k as usize, ge),
                JsetAbsH => fused!(op, ld_h, k as usize, set),
                JeqAbsW => fused!(op, ld_w, k as usize, eq),
                JgtAbsW => fused!(op, ld_w, k as usize, gt),
                JgeAbsW => fused!(op, ld_w, k as usize, ge),
                JsetAbsW => fused!(op, ld_w, k as usize, set),
                JeqIndB => fused!(op, ld_b, ind(x, k), eq),
                JgtIndB => fused!(op, ld_b, ind(x, k), gt),
                JgeIndB => fused!(op, ld_b, ind(x, k), ge),
                JsetIndB => fused!(op, ld_b, ind(x, k), set),
                JeqIndH => fused!(op, ld_h, ind(x, k), eq),
                JgtIndH => fused!(op, ld_h, ind(x, k), gt),
                JgeIndH => fused!(op, ld_h, ind(x, k), ge),
                JsetIndH => fused!(op, ld_h, ind(x, k), set),
                JeqIndW => fused!(op, ld_w, ind(x, k), eq),
                JgtIndW => fused!(op, ld_w, ind(x, k), gt),
                JgeIndW => fused!(op, ld_w, ind(x, k), ge),
                JsetIndW => fused!(op, ld_w, ind(x, k), set),
                LdAbsB => load!(ld_b, k as usize),
                LdAbsH => load!(ld_h, k as usize),
                LdAbsW => load!(ld_w, k as usize),
                LdIndB => load!(ld_b, ind(x, k)),
                LdIndH => load!(ld_h, ind(x, k)),
                LdIndW => load!(ld_w, ind(x, k)),
                LdImm => a = k,
                LdLen => a = wire_len,
                LdMem => a = mem[k as usize % mem.len()],
                LdxImm => x = k,
                LdxLen => x = wire_len,
                LdxMem => x = mem[k as usize % mem.len()],
                LdxMsh => match pkt.get(k as usize) {
                    Some(&b) => x = ((b & 0x0f) as u32) << 2,
                    None => return 0,
                },
                St => mem[k as usize % mem.len()] = a,
                Stx => mem[k as usize % mem.len()] = x,
                AddK => a = a.wrapping_add(k),
                AddX => a = a.wrapping_add(x),
                SubK => a = a.wrapping_sub(k),
                SubX => a = a.wrapping_sub(x),
                MulK => a = a.wrapping_mul(k),
                MulX => a = a.wrapping_mul(x),
                // libpcap rejects the packet on division by zero.
                DivK => match a.checked_div(k) {
                    Some(r) => a = r,
                    None => return 0,
                },
                DivX => match a.checked_div(x) {
                    Some(r) => a = r,
                    None => return 0,
                },
                ModK => match a.checked_rem(k) {
                    Some(r) => a = r,
                    None => return 0,
                },
                ModX => match a.checked_rem(x) {
                    Some(r) => a = r,
                    None => return 0,
                },
                OrK => a |= k,
                OrX => a |= x,
                AndK => a &= k,
                AndX => a &= x,
                XorK => a ^= k,
                XorX => a ^= x,
                // Shifts of 32 or more give 0, as in libpcap.
                LshK => a = a.checked_shl(k).unwrap_or(0),
                LshX => a = a.checked_shl(x).unwrap_or(0),
                RshK => a = a.checked_shr(k).unwrap_or(0),
                RshX => a = a.checked_shr(x).unwrap_or(0),
                Neg => a = a.wrapping_neg(),
                Ja => pc = op.jt as usize,
                JeqK => branch!(op, eq, k),
                JeqX => branch!(op, eq, x),
                JgtK => branch!(op, gt, k),
                JgtX => branch!(op, gt, x),
                JgeK => branch!(op, ge, k),
                JgeX => branch!(op, ge, x),
                JsetK => branch!(op, set, k),
                JsetX => branch!(op, set, x),
                RetK => return k,
                RetA => return a,
                RetX => return x,
                Tax => x = a,
                Txa => a = x,
            }
        }
    }

    /// Whether the packet passes the filter.
    #[inline]
    pub fn matches(&self, pkt: &[u8], wire_len: u32) -> bool {
        self.run(pkt, wire_len) != 0
    }
}

/// Packets a [`BatchRunner`] filters together.
pub const BATCH: usize = 64;

/// Longest program run batch-wise; its worklists take `BATCH` bytes per op.
const MAX_BATCHED: usize = 1024;

/// Runs a program over a batch of packets, one instruction at a time for
/// all the packets that reach it.
///
/// One packet at a time, every data-dependent branch (ethertype, IP
/// protocol, port) is a misprediction whenever the traffic is mixed,
/// and those dominate the cost of a filter. Here each instruction keeps
/// a worklist of the packets waiting at it; running it appends each
/// packet to the worklist of its successor, chosen with a conditional
/// move rather than a branch. Since jumps only go forward, taking the
/// instructions in order runs every packet along exactly its own path.
/// The loops over a worklist are regular, so nothing depends on packet
/// contents but data.
pub struct BatchRunner<'p> {
    program: &'p Program,
    /// Per op, the batch indices of the packets waiting at it.
    waiting: Vec<[u8; BATCH]>,
    counts: Vec<u8>,
    a: [u32; BATCH],
    x: [u32; BATCH],
    mem: Box<[Mem; BATCH]>,
    uses_mem: bool,
    verdicts: [u32; BATCH],
}

impl Program {
    /// A runner for batches of up to [`BATCH`] packets.
    pub fn batch_runner(&self) -> BatchRunner<'_> {
        let batched = !self.accept_all && self.ops.len() <= MAX_BATCHED;
        let n = if batched { self.ops.len() } else { 0 };
        BatchRunner {
            program: self,
            waiting: vec![[0; BATCH]; n],
            counts: vec![0; n],
            a: [0; BATCH],
            x: [0; BATCH],
            mem: Box::new([[0; BPF_MEMWORDS as usize]; BATCH]),
            uses_mem: self
                .ops
                .iter()
                .any(|o| matches!(o.code, Code::LdMem | Code::LdxMem | Code::St | Code::Stx)),
            verdicts: [0; BATCH],
        }
    }
}

impl BatchRunner<'_> {
    /// Sets `keep[i]` to whether `packets[i]`, `wire_lens[i]` bytes long on
    /// the wire, passes the filter: the same answers as
    /// [`Program::matches`]. At most [`BATCH`] packets at a time.
    pub fn run(&mut self, packets: &[&[u8]], wire_lens: &[u32], keep: &mut [bool]) {
        let len = packets.len().min(wire_lens.len()).min(keep.len());
        assert!(len <= BATCH, "batches hold at most {BATCH} packets");
        let prog = self.program;
        if prog.accept_all {
            keep[..len].fill(true);
            return;
        }
        if self.waiting.is_empty() {
            for i in 0..len {
                keep[i] = prog.matches(packets[i], wire_lens[i]);
            }
            return;
        }
        self.counts.fill(0);
        self.verdicts = [0; BATCH];
        if self.uses_mem {
            self.mem
                .iter_mut()
                .for_each(|m| *m = [0; BPF_MEMWORDS as usize]);
        }
        self.a = [0; BATCH];
        self.x = [0; BATCH];
        for (i, slot) in self.waiting[0][..len].iter_mut().enumerate() {
            *slot = i as u8;
        }
        self.counts[0] = len as u8;
        for pc in 0..prog.ops.len() {
            let count = self.counts[pc] as usize;
            if count == 0 {
                continue;
            }
            let list = self.waiting[pc];
            self.run_op(pc, &list[..count], packets, wire_lens);
        }
        for (k, v) in keep[..len].iter_mut().zip(&self.verdicts) {
            *k = *v != 0;
        }
    }

    fn run_op(&mut self, pc: usize, list: &[u8], packets: &[&[u8]], wire_lens: &[u32]) {
        use Code::*;
        let op = self.program.ops[pc];
        macro_rules! fused {
            ($load:literal, $cmp:literal) => {
                self.fused::<$load, $cmp>(op, list, packets)
            };
        }
        match op.code {
            JeqAbsB => fused!(0, 0),
            JgtAbsB => fused!(0, 1),
            JgeAbsB => fused!(0, 2),
            JsetAbsB => fused!(0, 3),
            JeqAbsH => fused!(1, 0),
            JgtAbsH => fused!(1, 1),
            JgeAbsH => fused!(1, 2),
            JsetAbsH => fused!(1, 3),
            JeqAbsW => fused!(2, 0),
            JgtAbsW => fused!(2, 1),
            JgeAbsW => fused!(2, 2),
            JsetAbsW => fused!(2, 3),
            JeqIndB => fused!(3, 0),
            JgtIndB => fused!(3, 1),
            JgeIndB => fused!(3, 2),
            JsetIndB => fused!(3, 3),
            JeqIndH => fused!(4, 0),
            JgtIndH => fused!(4, 1),
            JgeIndH => fused!(4, 2),
            JsetIndH => fused!(4, 3),
            JeqIndW => fused!(5, 0),
            JgtIndW => fused!(5, 1),
            JgeIndW => fused!(5, 2),
            JsetIndW => fused!(5, 3),
            JeqK => self.jump::<false, 0>(op, list),
            JgtK => self.jump::<false, 1>(op, list),
            JgeK => self.jump::<false, 2>(op, list),
            JsetK => self.jump::<false, 3>(op, list),
            JeqX => self.jump::<true, 0>(op, list),
            JgtX => self.jump::<true, 1>(op, list),
            JgeX => self.jump::<true, 2>(op, list),
            JsetX => self.jump::<true, 3>(op, list),
            Ja => {
                let t = op.jt as usize;
                let c = self.counts[t] as usize;
                self.waiting[t][c..c + list.len()].copy_from_slice(list);
                self.counts[t] = (c + list.len()) as u8;
            }
            RetK => list.iter().for_each(|&i| self.verdicts[i as usize] = op.k),
            RetA => list
                .iter()
                .for_each(|&i| self.verdicts[i as usize] = self.a[i as usize]),
            RetX => list
                .iter()
                .for_each(|&i| self.verdicts[i as usize] = self.x[i as usize]),
            _ => {
                let next = pc + 1;
                let mut c = self.counts[next] as usize;
                for &i in list {
                    let i = i as usize;
                    let mem = &mut self.mem[i];
                    // A rejected packet leaves its verdict at 0.
                    if step(
                        op,
                        packets[i],
                        wire_lens[i],
                        &mut self.a[i],
                        &mut self.x[i],
                        mem,
                    ) {
                        self.waiting[next][c] = i as u8;
                        c += 1;
                    }
                }
                self.counts[next] = c as u8;
            }
        }
    }

    /// The two worklists a branch feeds; `None` for the second when both
    /// targets are the same op.
    fn targets(&mut self, jt: usize, jf: usize) -> (&mut [u8; BATCH], Option<&mut [u8; BATCH]>) {
        if jt == jf {
            return (&mut self.waiting[jt], None);
        }
        let (lo, hi) = (jt.min(jf), jt.max(jf));
        let (left, right) = self.waiting.split_at_mut(hi);
        let (l, h) = (&mut left[lo], &mut right[0]);
        if jt < jf {
            (l, Some(h))
        } else {
            (h, Some(l))
        }
    }

    /// Sends each packet to `jt` or `jf` by `cond`, with no branch on it.
    #[inline(always)]
    fn split(
        &mut self,
        op: Op,
        list: &[u8],
        mut cond: impl FnMut(&mut Self, usize) -> Option<bool>,
    ) {
        let (jt, jf) = (op.jt as usize, op.jf as usize);
        let (mut ct, mut cf) = (self.counts[jt] as usize, self.counts[jf] as usize);
        // Gather each packet's outcome first, so the lists below are
        // written without holding `self` for `cond`.
        let mut outcome = [0u8; BATCH];
        for (o, &i) in outcome.iter_mut().zip(list) {
            // 0: rejected (verdict stays 0), 1: false, 2: true.
            *o = match cond(self, i as usize) {
                None => 0,
                Some(c) => 1 + c as u8,
            };
        }
        let same = jt == jf;
        let (t_list, f_list) = self.targets(jt, jf);
        match f_list {
            Some(f_list) => {
                for (&o, &i) in outcome.iter().zip(list) {
                    t_list[ct & (BATCH - 1)] = i;
                    f_list[cf & (BATCH - 1)] = i;
                    ct += (o == 2) as usize;
                    cf += (o == 1) as usize;
                }
            }
            None => {
                debug_assert!(same);
                for (&o, &i) in outcome.iter().zip(list) {
                    t_list[ct & (BATCH - 1)] = i;
                    ct += (o != 0) as usize;
                }
                cf = ct;
            }
        }
        self.counts[jt] = ct as u8;
        self.counts[jf] = cf as u8;
    }

    fn fused<const LOAD: u8, const CMP: u8>(&mut self, op: Op, list: &[u8], packets: &[&[u8]]) {
        let (k, m, v) = (op.k, op.m, op.v);
        self.split(op, list, |r, i| {
            let pkt = packets[i];
            let off = if LOAD >= 3 {
                ind(r.x[i], k)
            } else {
                k as usize
            };
            let val = match LOAD % 3 {
                0 => ld_b(pkt, off),
                1 => ld_h(pkt, off),
                _ => ld_w(pkt, off),
            }? & m;
            r.a[i] = val;
            Some(compare::<CMP>(val, v))
        })
    }

    fn jump<const X: bool, const CMP: u8>(&mut self, op: Op, list: &[u8]) {
        let k = op.k;
        self.split(op, list, |r, i| {
            let v = if X { r.x[i] } else { k };
            Some(compare::<CMP>(r.a[i], v))
        })
    }
}

/// The fused load-and-branch codes, indexed by `load_index * 4 + cmp`
/// (cmp: eq, gt, ge, set).
const FUSED: [Code; 24] = {
    use Code::*;
    [
        JeqAbsB, JgtAbsB, JgeAbsB, JsetAbsB, JeqAbsH, JgtAbsH, JgeAbsH, JsetAbsH, JeqAbsW, JgtAbsW,
        JgeAbsW, JsetAbsW, JeqIndB, JgtIndB, JgeIndB, JsetIndB, JeqIndH, JgtIndH, JgeIndH,
        JsetIndH, JeqIndW, JgtIndW, JgeIndW, JsetIndW,
    ]
};

/// Position of a packet load in [`FUSED`]'s rows.
fn load_index(c: Code) -> Option<usize> {
    Some(match c {
        Code::LdAbsB => 0,
        Code::LdAbsH => 1,
        Code::LdAbsW => 2,
        Code::LdIndB => 3,
        Code::LdIndH => 4,
        Code::LdIndW => 5,
        _ => return None,
    })
}

#[inline(always)]
fn eq(a: u32, v: u32) -> bool {
    a == v
}

#[inline(always)]
fn gt(a: u32, v: u32) -> bool {
    a > v
}

#[inline(always)]
fn ge(a: u32, v: u32) -> bool {
    a >= v
}

#[inline(always)]
fn set(a: u32, v: u32) -> bool {
    a & v != 0
}

/// A program translated into a graph of closures, one per instruction,
/// each calling its successor directly. Compared with the interpreter's
/// single dispatch point, a data-dependent branch becomes an ordinary
/// conditional branch whose misprediction resolves as soon as the packet
/// byte is compared, instead of after the next instruction's code has been
/// fetched and dispatched on.
type Node = Arc<dyn Fn(&[u8], u32, u32, u32, &mut Mem) -> u32 + Send + Sync>;

type Mem = [u32; BPF_MEMWORDS as usize];

/// Longest program translated into closures. Calls nest as deep as the
/// longest path (jumps only go forward), so longer programs, which libpcap
/// emits only for very long expressions, keep to the interpreter.
const MAX_COMPILED: usize = 1024;

fn compile_nodes(ops: &[Op]) -> Option<Node> {
    use Code::*;
    if ops.len() > MAX_COMPILED {
        return None;
    }
    let mut nodes: Vec<Option<Node>> = vec![None; ops.len()];
    for i in (0..ops.len()).rev() {
        let op = ops[i];
        // `from_raw` proved that jump targets lie ahead and that the last op
        // returns, so every successor is already built.
        let at = |t: u32| nodes.get(t as usize).cloned().flatten();
        let node: Node = match op.code {
            RetK => Arc::new(move |_, _, _, _, _| op.k),
            RetA => Arc::new(|_, _, a, _, _| a),
            RetX => Arc::new(|_, _, _, x, _| x),
            Ja => at(op.jt)?,
            JeqK | JeqX | JgtK | JgtX | JgeK | JgeX | JsetK | JsetX => {
                let (jt, jf) = (at(op.jt)?, at(op.jf)?);
                let x_operand = matches!(op.code, JeqX | JgtX | JgeX | JsetX);
                let cmp = match op.code {
                    JeqK | JeqX => 0,
                    JgtK | JgtX => 1,
                    JgeK | JgeX => 2,
                    _ => 3,
                };
                if x_operand {
                    jump_node::<true>(cmp, op.k, jt, jf)
                } else {
                    jump_node::<false>(cmp, op.k, jt, jf)
                }
            }
            c => match FUSED.iter().position(|&f| f == c) {
                Some(f) => fused_node(f / 4, f % 4, op, at(op.jt)?, at(op.jf)?),
                None => {
                    let next = at(i as u32 + 1)?;
                    if c == LdxMsh {
                        // The IP header length ahead of every transport
                        // field: worth its own node.
                        let k = op.k as usize;
                        Arc::new(move |pkt, wire, a, _, mem| match pkt.get(k) {
                            Some(&b) => next(pkt, wire, a, ((b & 0x0f) as u32) << 2, mem),
                            None => 0,
                        })
                    } else {
                        Arc::new(move |pkt, wire, mut a, mut x, mem| {
                            if step(op, pkt, wire, &mut a, &mut x, mem) {
                                next(pkt, wire, a, x, mem)
                            } else {
                                0
                            }
                        })
                    }
                }
            },
        };
        nodes[i] = Some(node);
    }
    nodes.swap_remove(0)
}

fn fused_node(load: usize, cmp: usize, op: Op, jt: Node, jf: Node) -> Node {
    match load {
        0 => fused_cmp::<0>(cmp, op, jt, jf),
        1 => fused_cmp::<1>(cmp, op, jt, jf),
        2 => fused_cmp::<2>(cmp, op, jt, jf),
        3 => fused_cmp::<3>(cmp, op, jt, jf),
        4 => fused_cmp::<4>(cmp, op, jt, jf),
        _ => fused_cmp::<5>(cmp, op, jt, jf),
    }
}

fn fused_cmp<const LOAD: u8>(cmp: usize, op: Op, jt: Node, jf: Node) -> Node {
    match cmp {
        0 => fused::<LOAD, 0>(op, jt, jf),
        1 => fused::<LOAD, 1>(op, jt, jf),
        2 => fused::<LOAD, 2>(op, jt, jf),
        _ => fused::<LOAD, 3>(op, jt, jf),
    }
}

/// `ld <LOAD>; [and #m;] j<CMP> #v` with the load kind (abs/ind × b/h/w,
/// numbered as in [`FUSED`]) and comparison fixed at compile time.
fn fused<const LOAD: u8, const CMP: u8>(op: Op, jt: Node, jf: Node) -> Node {
    let (k, m, v) = (op.k, op.m, op.v);
    Arc::new(move |pkt, wire, _, x, mem| {
        let off = if LOAD >= 3 { ind(x, k) } else { k as usize };
        let loaded = match LOAD % 3 {
            0 => ld_b(pkt, off),
            1 => ld_h(pkt, off),
            _ => ld_w(pkt, off),
        };
        let Some(val) = loaded else {
            return 0;
        };
        let a = val & m;
        if compare::<CMP>(a, v) {
            taken(&jt, pkt, wire, a, x, mem)
        } else {
            not_taken(pkt, wire, a, x, mem, &jf)
        }
    })
}

fn jump_node<const X: bool>(cmp: usize, k: u32, jt: Node, jf: Node) -> Node {
    fn make<const X: bool, const CMP: u8>(k: u32, jt: Node, jf: Node) -> Node {
        Arc::new(move |pkt, wire, a, x, mem| {
            let v = if X { x } else { k };
            if compare::<CMP>(a, v) {
                taken(&jt, pkt, wire, a, x, mem)
            } else {
                not_taken(pkt, wire, a, x, mem, &jf)
            }
        })
    }
    match cmp {
        0 => make::<X, 0>(k, jt, jf),
        1 => make::<X, 1>(k, jt, jf),
        2 => make::<X, 2>(k, jt, jf),
        _ => make::<X, 3>(k, jt, jf),
    }
}

// The two arms of a branch call through two distinct functions: with the
// same call in both arms the compiler merges them into one indirect call on
// a selected pointer, and the target then depends on the packet data, so a
// misprediction resolves only after two more dependent loads.
#[inline(never)]
fn taken(n: &Node, pkt: &[u8], wire: u32, a: u32, x: u32, mem: &mut Mem) -> u32 {
    n(pkt, wire, a, x, mem)
}

#[inline(never)]
fn not_taken(pkt: &[u8], wire: u32, a: u32, x: u32, mem: &mut Mem, n: &Node) -> u32 {
    n(pkt, wire, a, x, mem)
}

#[inline(always)]
fn compare<const CMP: u8>(a: u32, v: u32) -> bool {
    match CMP {
        0 => a == v,
        1 => a > v,
        2 => a >= v,
        _ => a & v != 0,
    }
}

/// Runs one non-branching, non-returning op; `false` rejects the packet.
#[inline]
fn step(op: Op, pkt: &[u8], wire_len: u32, a: &mut u32, x: &mut u32, mem: &mut Mem) -> bool {
    use Code::*;
    let k = op.k;
    let loaded = |v: Option<u32>, r: &mut u32| match v {
        Some(v) => {
            *r = v;
            true
        }
        None => false,
    };
    match op.code {
        LdAbsB => return loaded(ld_b(pkt, k as usize), a),
        LdAbsH => return loaded(ld_h(pkt, k as usize), a),
        LdAbsW => return loaded(ld_w(pkt, k as usize), a),
        LdIndB => return loaded(ld_b(pkt, ind(*x, k)), a),
        LdIndH => return loaded(ld_h(pkt, ind(*x, k)), a),
        LdIndW => return loaded(ld_w(pkt, ind(*x, k)), a),
        LdxMsh => return loaded(ld_b(pkt, k as usize).map(|b| (b & 0x0f) << 2), x),
        DivK => return loaded(a.checked_div(k), a),
        DivX => return loaded(a.checked_div(*x), a),
        ModK => return loaded(a.checked_rem(k), a),
        ModX => return loaded(a.checked_rem(*x), a),
        LdImm => *a = k,
        LdLen => *a = wire_len,
        LdMem => *a = mem[k as usize % mem.len()],
        LdxImm => *x = k,
        LdxLen => *x = wire_len,
        LdxMem => *x = mem[k as usize % mem.len()],
        St => mem[k as usize % mem.len()] = *a,
        Stx => mem[k as usize % mem.len()] = *x,
        AddK => *a = a.wrapping_add(k),
        AddX => *a = a.wrapping_add(*x),
        SubK => *a = a.wrapping_sub(k),
        SubX => *a = a.wrapping_sub(*x),
        MulK => *a = a.wrapping_mul(k),
        MulX => *a = a.wrapping_mul(*x),
        OrK => *a |= k,
        OrX => *a |= *x,
        AndK => *a &= k,
        AndX => *a &= *x,
        XorK => *a ^= k,
        XorX => *a ^= *x,
        LshK => *a = a.checked_shl(k).unwrap_or(0),
        LshX => *a = a.checked_shl(*x).unwrap_or(0),
        RshK => *a = a.checked_shr(k).unwrap_or(0),
        RshX => *a = a.checked_shr(*x).unwrap_or(0),
        Neg => *a = a.wrapping_neg(),
        Tax => *x = *a,
        Txa => *a = *x,
        // Jumps, returns and fused ops have nodes of their own.
        _ => return false,
    }
    true
}

/// X + k as a packet offset; an overflowing sum is out of any packet.
#[inline(always)]
fn ind(x: u32, k: u32) -> usize {
    match x.checked_add(k) {
        Some(o) => o as usize,
        None => usize::MAX,
    }
}

#[inline(always)]
fn ld_b(pkt: &[u8], off: usize) -> Option<u32> {
    pkt.get(off).map(|&b| b as u32)
}

#[inline(always)]
fn ld_h(pkt: &[u8], off: usize) -> Option<u32> {
    let b = pkt.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]) as u32)
}

#[inline(always)]
fn ld_w(pkt: &[u8], off: usize) -> Option<u32> {
    let b = pkt.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Runs libpcap's compiler and returns its raw instructions.
pub fn compile_raw(expr: &str, linktype: u32, snaplen: u32) -> Result<Vec<RawInsn>, FilterError> {
    let err = |message: String| FilterError {
        expr: expr.to_string(),
        message,
    };
    // The `pcap` crate opens dead handles with snaplen 65535; libpcap only
    // uses it for the accept value, and the evaluator treats any non-zero
    // return as "keep" (offline, tcpdump does not truncate by it either).
    let _ = snaplen;
    let dead =
        pcap::Capture::dead(pcap::Linktype(linktype as i32)).map_err(|e| err(e.to_string()))?;
    let prog = dead.compile(expr, true).map_err(|e| match e {
        pcap::Error::PcapError(m) => err(m),
        other => err(other.to_string()),
    })?;
    // The crate keeps `bpf_insn`'s fields private but prints them as
    // "code jt jf k"; parse that rather than reaching into its layout.
    prog.get_instructions()
        .iter()
        .map(|ins| {
            let s = ins.to_string();
            let mut it = s.split_ascii_whitespace().map(|f| f.parse::<u64>());
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some(Ok(code)), Some(Ok(jt)), Some(Ok(jf)), Some(Ok(k))) => Ok(RawInsn {
                    code: code as u16,
                    jt: jt as u8,
                    jf: jf as u8,
                    k: k as u32,
                }),
                _ => Err(err(format!("unexpected instruction text {s:?}"))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(expr: &str) -> Program {
        Program::compile(expr, LINKTYPE_ETHERNET, 65535).unwrap()
    }

    /// Ethernet + IPv4 + TCP SYN from 10.0.0.1:1234 to 10.0.0.2:80.
    fn tcp_syn() -> Vec<u8> {
        let mut p = vec![0u8; 14 + 20 + 20];
        p[12] = 0x08;
        p[14] = 0x45;
        p[16..18].copy_from_slice(&40u16.to_be_bytes());
        p[22] = 64;
        p[23] = 6;
        p[26..30].copy_from_slice(&[10, 0, 0, 1]);
        p[30..34].copy_from_slice(&[10, 0, 0, 2]);
        p[34..36].copy_from_slice(&1234u16.to_be_bytes());
        p[36..38].copy_from_slice(&80u16.to_be_bytes());
        p[46] = 0x50;
        p[47] = 0x02;
        p
    }

    #[test]
    fn basic_expressions() {
        let p = tcp_syn();
        let len = p.len() as u32;
        for (expr, want) in [
            ("", true),
            ("tcp", true),
            ("udp", false),
            ("host 10.0.0.1", true),
            ("src host 10.0.0.2", false),
            ("net 10.0.0.0/24 and dst port 80", true),
            ("portrange 70-90", true),
            ("portrange 81-90", false),
            ("tcp[tcpflags] & tcp-syn != 0", true),
            ("tcp[tcpflags] & tcp-ack != 0", false),
            ("not vlan", true),
            ("ip6", false),
            ("len > 100", false),
            ("len <= 54", true),
        ] {
            assert_eq!(prog(expr).matches(&p, len), want, "{expr}");
        }
    }

    #[test]
    fn truncated_packets_are_rejected_not_crashed() {
        let p = tcp_syn();
        let f = prog("tcp dst port 80");
        for cut in 0..p.len() {
            let _ = f.matches(&p[..cut], p.len() as u32);
        }
        assert!(!f.matches(&p[..30], 54));
    }

    #[test]
    fn invalid_expression_has_libpcap_message() {
        let e = Program::compile("tcp porrt 80", LINKTYPE_ETHERNET, 65535).unwrap_err();
        assert!(e.message.contains("syntax error"), "{}", e.message);
        let e = Program::compile("host 999.1.1.1", LINKTYPE_ETHERNET, 65535).unwrap_err();
        assert!(!e.message.is_empty());
    }

    #[test]
    fn rejects_bad_programs() {
        let ret = RawInsn {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 1,
        };
        assert_eq!(Program::from_raw(&[]).unwrap_err(), ProgramError::Empty);
        let jmp = RawInsn {
            code: 0x15,
            jt: 5,
            jf: 0,
            k: 0,
        };
        assert_eq!(
            Program::from_raw(&[jmp, ret]).unwrap_err(),
            ProgramError::BadJump(0)
        );
        let st = RawInsn {
            code: 0x02,
            jt: 0,
            jf: 0,
            k: 16,
        };
        assert_eq!(
            Program::from_raw(&[st, ret]).unwrap_err(),
            ProgramError::BadMem(0, 16)
        );
        let ld = RawInsn {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        };
        assert_eq!(
            Program::from_raw(&[ld]).unwrap_err(),
            ProgramError::NoReturn
        );
    }

    #[test]
    fn alu_edge_cases() {
        // A = 7; A /= X (X = 0) -> reject.
        let prog = Program::from_raw(&[
            RawInsn {
                code: 0x00,
                jt: 0,
                jf: 0,
                k: 7,
            },
            RawInsn {
                code: 0x3c,
                jt: 0,
                jf: 0,
                k: 0,
            },
            RawInsn {
                code: 0x16,
                jt: 0,
                jf: 0,
                k: 0,
            },
        ])
        .unwrap();
        assert_eq!(prog.run(&[], 0), 0);
        // A = 1; A <<= 40 -> 0; ret A + 5.
        let prog = Program::from_raw(&[
            RawInsn {
                code: 0x00,
                jt: 0,
                jf: 0,
                k: 1,
            },
            RawInsn {
                code: 0x64,
                jt: 0,
                jf: 0,
                k: 40,
            },
            RawInsn {
                code: 0x04,
                jt: 0,
                jf: 0,
                k: 5,
            },
            RawInsn {
                code: 0x16,
                jt: 0,
                jf: 0,
                k: 0,
            },
        ])
        .unwrap();
        assert_eq!(prog.run(&[], 0), 5);
    }

    #[test]
    fn closures_and_batches_agree_with_the_interpreter() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        // Every opcode class, with short jumps so most programs validate.
        let codes: [u16; 50] = [
            0x00, 0x20, 0x28, 0x30, 0x40, 0x48, 0x50, 0x60, 0x80, 0x01, 0x61, 0x81, 0xb1, 0x02,
            0x03, 0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3c, 0x44, 0x4c, 0x54, 0x5c, 0x64,
            0x6c, 0x74, 0x7c, 0x84, 0x94, 0x9c, 0xa4, 0xac, 0x05, 0x15, 0x1d, 0x25, 0x2d, 0x35,
            0x3d, 0x45, 0x4d, 0x06, 0x0e, 0x16, 0x07, 0x87,
        ];
        let mut rng = SmallRng::seed_from_u64(9);
        let mut checked = 0;
        for _ in 0..100_000 {
            let len = rng.random_range(1..16);
            let raw: Vec<RawInsn> = (0..len)
                .map(|_| RawInsn {
                    code: codes[rng.random_range(0..codes.len())],
                    jt: rng.random_range(0..3),
                    jf: rng.random_range(0..3),
                    k: if rng.random_ratio(3, 4) {
                        rng.random_range(0..40)
                    } else {
                        rng.random()
                    },
                })
                .collect();
            // (An accept-all program returns early without evaluating.)
            let Ok(p) = Program::from_raw(&raw) else {
                continue;
            };
            if p.accept_all {
                continue;
            }
            assert!(p.compiled.is_some());
            let pkts: Vec<Vec<u8>> = (0..rng.random_range(1..=BATCH))
                .map(|_| (0..rng.random_range(0..48)).map(|_| rng.random()).collect())
                .collect();
            let wires: Vec<u32> = pkts.iter().map(|_| rng.random_range(0..100)).collect();
            for (pkt, &wire) in pkts.iter().zip(&wires) {
                assert_eq!(
                    p.run(pkt, wire),
                    p.interpret(pkt, wire),
                    "{raw:?} on {pkt:02x?}"
                );
            }
            let slices: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
            let mut keep = vec![false; pkts.len()];
            p.batch_runner().run(&slices, &wires, &mut keep);
            for (i, k) in keep.iter().enumerate() {
                assert_eq!(
                    *k,
                    p.interpret(slices[i], wires[i]) != 0,
                    "{raw:?} in a batch on {:02x?}",
                    slices[i]
                );
            }
            checked += 1;
        }
        assert!(checked > 1_000, "only {checked} programs validated");
    }

    #[test]
    fn long_programs_fall_back_to_the_interpreter() {
        let expr = (0..300)
            .map(|i| format!("host 10.0.{}.{}", i / 250, i % 250 + 1))
            .collect::<Vec<_>>()
            .join(" or ");
        let p = prog(&expr);
        assert!(p.ops.len() > MAX_COMPILED && p.compiled.is_none());
        let mut pkt = tcp_syn();
        pkt[30..34].copy_from_slice(&[10, 9, 9, 8]);
        pkt[26..30].copy_from_slice(&[10, 0, 1, 7]);
        assert!(p.matches(&pkt, pkt.len() as u32));
        pkt[26..30].copy_from_slice(&[10, 9, 9, 9]);
        assert!(!p.matches(&pkt, pkt.len() as u32));
    }
}

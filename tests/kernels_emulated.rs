//! The device forward's CUDA kernels (`src/model/device/kernels.cu`) run on the CPU by `kernel-emu`, with the
//! launch geometry the CUDA launcher uses (`model::device::launch`), against the ops' CPU implementations
//! (`model::device::ops`): the same cases the GPU test runs (`tests/common/kernel_cases.rs`). So a change to a kernel is checked on every machine, not only when a GPU is at hand. Every buffer
//! carries NaN canaries on both sides (a write past it fails, a read past it poisons the result), and every
//! output starts as NaN (an element the kernel never writes fails the comparison).
// The emulated kernels take raw pointers, as on a GPU.
#![allow(unsafe_code)]
#![cfg(target_os = "linux")]

mod common;

use amlserve::model::arch::Activation;
use amlserve::model::device::launch::{self, AttentionPlan, Dims};
use amlserve::model::device::ops::{AddBias, AddRmsNorm, GatedAct, HeadNorms, Heads};
use amlserve_kernel_emu::{Arg, Guarded};
use candle_core::{DType, Device, Tensor};
use common::kernel_cases::{attention_cases, ramp, rel_l2, run_ops, step, AttentionCase, Step, NORMED_HEADS, Q_SCALE};

/// Launches kernel `name` in the emulation; panics with its message if it cannot run.
fn run(name: &str, d: Dims, args: &[Arg]) {
    // SAFETY: each test passes buffers sized for the kernel's arguments as the CUDA launcher does; the
    // canaries around them turn an overrun into a test failure.
    unsafe { amlserve_kernel_emu::launch(name, d.grid, d.block, d.shared, args) }.unwrap_or_else(|e| panic!("{e}"));
}

fn nan(n: usize) -> Guarded<f32> {
    Guarded::new(&vec![f32::NAN; n], f32::NAN)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

fn int(n: usize) -> Arg {
    Arg::I32(i32::try_from(n).expect("fits i32"))
}

/// What the emulated store and attention give for a step, the attention run as `plan` says (as the CUDA launcher
/// runs it): (pool as f32, out). The rotary embedding is applied as keys are stored and queries read: `qkv` must
/// come back unchanged.
fn emulate(s: &Step, window: Option<usize>, plan: AttentionPlan) -> (Vec<f32>, Vec<f32>) {
    let h: Heads = s.heads;
    let mut qkv = Guarded::new(&s.qkv, f32::NAN);
    let mut meta = Guarded::new(&s.meta, u32::MAX);
    let mut table = Guarded::new(&s.table, f32::NAN);
    let bits: Vec<u16> = s.pool.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    // A bf16 NaN.
    let mut pool = Guarded::new(&bits, 0x7fc1);
    // As a GPU allocation is: the grouped kernel reads key rows 16 bytes at a time.
    assert_eq!(pool.data().as_ptr() as usize % 16, 0, "the pool starts 16-byte aligned");
    run(
        "amlserve_store_kv_bf16",
        launch::store_kv(s.tokens),
        &[
            pool.ptr(),
            qkv.ptr(),
            meta.ptr(),
            table.ptr(),
            int(s.tokens),
            int(h.width()),
            int(h.k_col()),
            int(2 * h.kv_row()),
            int(h.head_dim),
        ],
    );
    let mut out = nan(s.tokens * h.n_head * h.head_dim);
    let mut partial = nan(launch::attention_partial_len(plan.per_row, h, plan.splits));
    let window = window.map_or(0, |w| i32::try_from(w).expect("window"));
    if plan.per_row > 0 {
        let (kernel, dims) = plan.row_kernel(h);
        run(
            kernel,
            dims,
            &[
                out.ptr(),
                partial.ptr(),
                qkv.ptr(),
                pool.ptr(),
                meta.ptr(),
                table.ptr(),
                Arg::F32(Q_SCALE),
                int(s.tokens),
                int(h.width()),
                int(h.n_head),
                int(h.n_kv_head),
                int(h.head_dim),
                Arg::I32(window),
                int(plan.splits),
            ],
        );
        if plan.splits > 1 {
            run(
                "amlserve_attention_combine",
                launch::attention_combine(plan.per_row, h),
                &[
                    out.ptr(),
                    partial.ptr(),
                    int(h.n_head),
                    int(h.head_dim),
                    int(plan.splits),
                ],
            );
        }
    }
    if let Some(t) = plan.tiled {
        run(
            "amlserve_prefill_attention_bf16",
            t.dims,
            &[
                out.ptr(),
                qkv.ptr(),
                pool.ptr(),
                meta.ptr(),
                table.ptr(),
                Arg::F32(Q_SCALE),
                int(s.tokens),
                int(t.first),
                int(h.width()),
                int(h.n_head),
                int(h.n_kv_head),
                int(h.head_dim),
                Arg::I32(window),
                int(t.qt),
                int(t.kt),
            ],
        );
    }
    for (buf, what) in [
        (&qkv, "qkv"),
        (&table, "rope table"),
        (&out, "out"),
        (&partial, "partial"),
    ] {
        buf.check(what).unwrap_or_else(|e| panic!("{e}"));
    }
    meta.check("meta").unwrap_or_else(|e| panic!("{e}"));
    pool.check("pool").unwrap_or_else(|e| panic!("{e}"));
    assert!(qkv.data() == &s.qkv[..], "qkv was changed");
    let pool = pool.data().iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
    (pool, out.data().to_vec())
}

/// The plans a step is checked under: every token read one at a time by the per-row kernel and (where it takes
/// the heads) the grouped one, whole and split as on an H200 (132 multiprocessors); the launcher's own plan for an
/// H200; and every token tiled.
fn plans(s: &Step) -> Vec<(&'static str, AttentionPlan)> {
    let h = s.heads;
    let one_at_a_time = |grouped: bool, splits| AttentionPlan {
        per_row: s.tokens,
        splits,
        grouped,
        tiled: None,
    };
    let mut plans = vec![
        ("per row", one_at_a_time(false, 1)),
        (
            "per row, split",
            one_at_a_time(false, launch::attention_splits(132, s.tokens, h.n_head, 8)),
        ),
        ("the launcher's", launch::attention_plan(s.meta(), h, 132)),
    ];
    if launch::grouped_kernel(h).is_some() {
        plans.push(("grouped", one_at_a_time(true, 1)));
        plans.push((
            "grouped, split",
            one_at_a_time(true, launch::attention_splits(132, s.tokens, h.n_kv_head, 4)),
        ));
    }
    if let Some(t) = launch::tiled_shape(0, s.tokens, h) {
        let tiled = AttentionPlan {
            per_row: 0,
            splits: 1,
            grouped: false,
            tiled: Some(t),
        };
        plans.push(("tiled", tiled));
    }
    let mut seen = Vec::new();
    plans.retain(|(_, p)| {
        let fresh = !seen.contains(p);
        seen.push(*p);
        fresh
    });
    plans
}

#[test]
fn store_and_paged_attention_match_the_cpu_ops_under_every_plan() {
    let cases: Vec<_> = attention_cases().into_iter().enumerate().collect();
    // The cases on every core: each emulated launch runs on its own thread.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for chunk in cases.chunks(cases.len().div_ceil(threads)) {
            scope.spawn(move || {
                for (i, AttentionCase { heads, seqs, window }) in chunk {
                    let (heads, window) = (*heads, *window);
                    let s = step(heads, seqs, *i as u64);
                    let (p_cpu, o_cpu) = run_ops(&Device::Cpu, &s, window);
                    let (p_cpu, o_cpu) = (values(&p_cpu), values(&o_cpu));
                    for (name, plan) in plans(&s) {
                        let (p, o) = emulate(&s, window, plan);
                        let (ep, eo) = (rel_l2(&p, &p_cpu), rel_l2(&o, &o_cpu));
                        println!(
                            "{heads:?}, {} tokens, window {window:?}, {name} {plan:?}: store {ep:.2e}, attention {eo:.2e}",
                            s.tokens
                        );
                        // The same rotation and rounding to bf16 on both sides.
                        assert_eq!(p, p_cpu, "store");
                        assert!(eo < 1e-5, "attention {eo}: {heads:?}, {seqs:?}, window {window:?}, {name} {plan:?}");
                    }
                }
            });
        }
    });
}

#[test]
fn the_gated_activations_match_the_cpu_op() {
    let (rows, width) = (37, 1536);
    let x = ramp(0, rows * 2 * width, 8.0, -4.0);
    for act in [Activation::Silu, Activation::GeluTanh] {
        let cpu = Tensor::from_slice(&x, (rows, 2 * width), &Device::Cpu)
            .and_then(|t| t.apply_op1_no_bwd(&GatedAct { width, act }))
            .expect("gated activation");
        let mut input = Guarded::new(&x, f32::NAN);
        let mut out = nan(rows * width);
        let gelu = i32::from(act == Activation::GeluTanh);
        run(
            "amlserve_gated",
            launch::grid_stride(rows * width),
            &[out.ptr(), input.ptr(), int(rows), int(width), Arg::I32(gelu)],
        );
        out.check("out").unwrap_or_else(|e| panic!("{e}"));
        let e = rel_l2(out.data(), &values(&cpu));
        println!("gated {act:?}: {e:.2e}");
        assert!(e < 1e-6, "gated {act:?} {e}");
    }
}

#[test]
fn biases_and_per_head_norms_match_the_cpu_ops() {
    for heads in NORMED_HEADS {
        let (rows, width, hd) = (37, heads.width(), heads.head_dim);
        let (x, bias, qn, kn) = (
            ramp(1, rows * width, 4.0, -2.0),
            ramp(2, width, 4.0, -2.0),
            ramp(3, hd, 4.0, -2.0),
            ramp(4, hd, 4.0, -2.0),
        );
        let cpu = {
            let d = &Device::Cpu;
            let qkv = Tensor::from_slice(&x, (rows, width), d).expect("qkv");
            qkv.inplace_op2(&Tensor::from_slice(&bias, width, d).expect("bias"), &AddBias)
                .expect("bias");
            let (q, k) = (
                Tensor::from_slice(&qn, hd, d).expect("qn"),
                Tensor::from_slice(&kn, hd, d).expect("kn"),
            );
            qkv.inplace_op3(&q, &k, &HeadNorms { heads, eps: 1e-6 })
                .expect("head norms");
            values(&qkv)
        };
        let mut qkv = Guarded::new(&x, f32::NAN);
        let (mut b, mut q, mut k) = (
            Guarded::new(&bias, f32::NAN),
            Guarded::new(&qn, f32::NAN),
            Guarded::new(&kn, f32::NAN),
        );
        run(
            "amlserve_add_bias",
            launch::grid_stride(rows * width),
            &[qkv.ptr(), b.ptr(), int(rows), int(width)],
        );
        run(
            "amlserve_head_norms",
            launch::head_norms(rows, heads),
            &[
                qkv.ptr(),
                q.ptr(),
                k.ptr(),
                int(width),
                int(heads.n_head),
                int(hd),
                Arg::F32(1e-6),
            ],
        );
        qkv.check("qkv").unwrap_or_else(|e| panic!("{e}"));
        let e = rel_l2(qkv.data(), &cpu);
        println!("bias + head norms, {heads:?}: {e:.2e}");
        assert!(e < 1e-6, "bias + head norms {e}");
    }
}

#[test]
fn the_residual_add_and_norm_match_the_cpu_op() {
    let rows = 37;
    for hidden in [576, 640, 2048] {
        let (x, y, w) = (
            ramp(1, rows * hidden, 4.0, -2.0),
            ramp(2, rows * hidden, 4.0, -2.0),
            ramp(3, hidden, 4.0, -2.0),
        );
        let d = &Device::Cpu;
        let cpu = Tensor::from_slice(&x, (rows, hidden), d)
            .and_then(|xt| {
                xt.apply_op3_no_bwd(
                    &Tensor::from_slice(&y, (rows, hidden), d)?,
                    &Tensor::from_slice(&w, hidden, d)?,
                    &AddRmsNorm { eps: 1e-5 },
                )
            })
            .expect("add-rms-norm");
        let mut out = nan(2 * rows * hidden);
        let (mut xg, mut yg, mut wg) = (
            Guarded::new(&x, f32::NAN),
            Guarded::new(&y, f32::NAN),
            Guarded::new(&w, f32::NAN),
        );
        run(
            "amlserve_add_rms_norm",
            launch::add_rms_norm(rows),
            &[
                out.ptr(),
                xg.ptr(),
                yg.ptr(),
                wg.ptr(),
                int(rows),
                int(hidden),
                Arg::F32(1e-5),
            ],
        );
        out.check("out").unwrap_or_else(|e| panic!("{e}"));
        let e = rel_l2(out.data(), &values(&cpu));
        println!("add + rms norm, hidden {hidden}: {e:.2e}");
        assert!(e < 1e-6, "add + rms norm {e}");
    }
}

#[test]
fn row_argmax_picks_the_greedy_token_as_the_sampler_does() {
    use amlserve::model::device::ops::RowArgmax;
    for vocab in [49_152, 1_000, 37] {
        let mut rows: Vec<Vec<f32>> = (0..6).map(|r| ramp(r * 13, vocab, 20.0, -10.0)).collect();
        // Ties (the first wins), NaN (never wins), -0 against 0, a row of NaN, a row of -inf.
        let top = vocab - 3;
        rows[0][top] = 50.0;
        rows[0][vocab - 1] = 50.0;
        rows[1][0] = f32::NAN;
        rows[1][5] = f32::NAN;
        rows[1][top] = 60.0;
        rows[2].iter_mut().for_each(|v| *v = v.min(-1.0));
        rows[2][vocab / 2] = -0.0;
        rows[2][vocab - 1] = 0.0;
        rows[3].iter_mut().for_each(|v| *v = f32::NAN);
        rows[4].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        rows[4][vocab - 2] = f32::NAN;
        let flat: Vec<f32> = rows.concat();
        let expected: Vec<u32> = rows.iter().map(|r| amlserve::engine::sampler::argmax(r)).collect();
        assert_eq!(expected[0], top as u32);
        assert_eq!(expected[2], (vocab / 2) as u32);
        let cpu: Vec<u32> = Tensor::from_slice(&flat, (rows.len(), vocab), &Device::Cpu)
            .and_then(|t| t.apply_op1_no_bwd(&RowArgmax))
            .and_then(|t| t.to_vec1())
            .expect("argmax op");
        assert_eq!(cpu, expected, "the op's CPU implementation");
        let mut x = Guarded::new(&flat, f32::NAN);
        let mut out = Guarded::new(&vec![u32::MAX; rows.len()], 0xdead_beef);
        run(
            "amlserve_row_argmax",
            launch::row_argmax(rows.len()),
            &[out.ptr(), x.ptr(), int(rows.len()), int(vocab)],
        );
        out.check("out").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.data(), &expected[..], "vocabulary {vocab}");
    }
}

#[test]
fn the_launchers_constants_are_the_kernels_own() {
    let source = include_str!("../src/model/device/kernels.cu");
    let define = |name: &str| -> usize {
        let line = source
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("kernels.cu defines {name}"));
        line.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .expect("a number")
    };
    assert_eq!(define("ATTN_THREADS"), launch::ATTN_THREADS as usize);
    assert_eq!(define("ATTN_TILE"), launch::ATTN_TILE as usize);
    assert_eq!(
        define("MAX_DIMS_PER_THREAD") * define("ATTN_THREADS"),
        launch::MAX_HEAD_DIM
    );
    assert_eq!(define("TILE_OUT_PER_THREAD"), launch::TILE_OUT_PER_THREAD);
    assert_eq!(define("ARGMAX_THREADS"), launch::ARGMAX_THREADS as usize);
    assert_eq!(define("BLOCK_TOKENS"), amlserve::model::device::paged::BLOCK);
    assert_eq!(define("GROUPED_WARPS"), launch::GROUPED_WARPS as usize);
    assert_eq!(define("Q8_WARPS"), launch::Q8_WARPS as usize);
    // Each Q8_0 kernel's rows and columns a warp, as the launcher takes them.
    let q8: Vec<(&str, usize, usize)> = source
        .lines()
        .filter_map(|l| l.strip_prefix("Q8_0_ROWS(")?.strip_suffix(')'))
        .map(|args| {
            let v: Vec<&str> = args.split(", ").collect();
            (v[0], v[1].parse().expect("rows"), v[2].parse().expect("columns"))
        })
        .collect();
    assert_eq!(q8.len(), 4, "{q8:?}");
    for (name, rows, cols) in q8 {
        assert_eq!(launch::q8_rows_kernel(rows), (name, cols));
    }
}

#[test]
fn every_kernel_in_the_source_is_emulated() {
    let source = include_str!("../src/model/device/kernels.cu");
    // Kernels defined directly, and those a macro instantiates (`GROUPED_ATTENTION(name, ...)`,
    // `Q8_0_ROWS(name, ...)`, whose own definitions name their parameter `name`).
    let names: Vec<&str> = source
        .split("__global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .filter(|&n| n != "name")
        .chain(source.lines().filter_map(|l| {
            ["GROUPED_ATTENTION(", "Q8_0_ROWS("]
                .iter()
                .find_map(|m| l.strip_prefix(m))
                .and_then(|rest| rest.split(',').next())
        }))
        .collect();
    assert!(names.len() >= 16, "kernels found: {names:?}");
    for h in [
        common::kernel_cases::SMOLLM2,
        common::kernel_cases::LLAMA3,
        common::kernel_cases::GEMMA3,
    ] {
        let grouped = launch::grouped_kernel(h).expect("a grouped kernel");
        assert!(names.contains(&grouped), "{grouped} is not in kernels.cu");
    }
    for rows in 1..=launch::Q8_MAX_ROWS {
        let q8 = launch::q8_rows_kernel(rows).0;
        assert!(names.contains(&q8), "{q8} is not in kernels.cu");
    }
    for name in names {
        assert!(
            amlserve_kernel_emu::knows(name),
            "kernel-emu/emu.cpp does not list {name}"
        );
    }
}

#[test]
fn q8_0_rows_match_the_exact_product_and_the_cpu_op() {
    use amlserve::model::device::ops::Q8Rows;
    use common::kernel_cases::{Q8Case, Q8_GATES, Q8_SHAPES};
    for shape in Q8_SHAPES {
        let c = Q8Case::new(shape);
        let q = std::sync::Arc::new(c.quantized(&Device::Cpu));
        let bytes = q.data().expect("raw blocks").into_owned();
        assert_eq!(bytes.len(), c.n * c.k / 32 * 34, "ggml's Q8_0 blocks");
        let words: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let mut w = Guarded::new(&words, 0xffff);
        for gate in Q8_GATES {
            let input = c.input(gate);
            let exact = c.exact(&c.multiplied(gate));
            let cpu = Tensor::from_slice(input, (c.rows, input.len() / c.rows), &Device::Cpu)
                .and_then(|x| {
                    x.apply_op1_no_bwd(&Q8Rows {
                        weight: q.clone(),
                        gate,
                    })
                })
                .expect("q8 rows");
            let mut x = Guarded::new(input, f32::NAN);
            assert_eq!(
                x.data().as_ptr() as usize % 16,
                0,
                "the activations start 16-byte aligned"
            );
            let mut out = nan(c.rows * c.n);
            run(
                launch::q8_rows_kernel(c.rows).0,
                launch::q8_rows(c.rows, c.n),
                &[
                    out.ptr(),
                    w.ptr(),
                    x.ptr(),
                    int(c.rows),
                    int(c.n),
                    int(c.k),
                    Arg::I32(launch::q8_gate(gate)),
                ],
            );
            out.check("out").unwrap_or_else(|e| panic!("{e}"));
            let (e, e_cpu) = (rel_l2(out.data(), &exact), rel_l2(&values(&cpu), &exact));
            println!(
                "q8_0 rows {shape:?}, gate {gate:?}: kernel {e:.2e}, CPU op (activations quantized too) {e_cpu:.2e}"
            );
            assert!(e < 1e-6, "q8 rows {shape:?} {gate:?}: {e}");
            // Column by column too, so the columns of small (subnormal f16 scales) and zero weights count.
            for col in 0..c.n {
                let pick = |v: &[f32]| -> Vec<f32> { (0..c.rows).map(|r| v[r * c.n + col]).collect() };
                let (got, want) = (pick(out.data()), pick(&exact));
                if want.iter().all(|&v| v == 0.0) {
                    assert!(got.iter().all(|&v| v == 0.0), "column {col} of zero weights: {got:?}");
                } else {
                    let e = rel_l2(&got, &want);
                    assert!(e < 1e-5, "q8 rows {shape:?} {gate:?}, column {col}: {e}");
                }
            }
            // candle's CPU kernels quantize the activations to 8 bits as well: the same product, to that rounding.
            assert!(e_cpu < 2e-2, "the CPU op {shape:?} {gate:?}: {e_cpu}");
        }
    }
}

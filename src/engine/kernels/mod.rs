//! I2_S × int8 kernels with runtime dispatch. `scalar` is the specification;
//! every other file is one instruction set, tested bit for bit against it.

pub mod scalar;

/// The instruction-set path an engine uses for its I2_S products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        Kernel::Scalar
    }

    /// Every kernel this CPU can run (the scalar one first).
    pub fn available() -> Vec<Kernel> {
        vec![Kernel::Scalar]
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
        }
    }

    /// `out[(r - rows.start) * n_tok + t] = Σ code·q` for the packed rows
    /// `rows` of `w` (row length `n_in`) and the `n_tok` activation rows of
    /// `q`. `wrap` reproduces bitnet.cpp's 16-bit lane wrap.
    pub fn matmul(
        self,
        wrap: bool,
        w: &[u8],
        n_in: usize,
        rows: std::ops::Range<usize>,
        q: &[i8],
        out: &mut [i32],
    ) {
        assert!(n_in > 0 && n_in % scalar::BLOCK == 0);
        assert!(w.len() >= rows.end * n_in / 4);
        assert_eq!(q.len() % n_in, 0);
        assert_eq!(out.len(), rows.len() * (q.len() / n_in));
        match self {
            Kernel::Scalar => scalar::matmul(wrap, w, n_in, rows, q, out),
        }
    }
}

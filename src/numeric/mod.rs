//! The numeric layer shared by the algorithm and the devices: Gram matrices and their
//! accumulation ([`gram`]), quantization grids and their arithmetic ([`grid`]), visiting orders
//! ([`order`]), dense linear algebra ([`linalg`]) and the GPTQ-style factor and row pass
//! ([`gptq`]). It imports nothing above it: the devices run these kernels, and `crate::quant`
//! decides when.

pub mod gptq;
pub mod gram;
pub mod grid;
pub mod linalg;
pub mod order;

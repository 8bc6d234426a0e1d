//! The local inference engine: small models served by the proxy itself on
//! wgpu compute shaders, used for `local:` backends and as the last link of a
//! fallback chain. It knows nothing of HTTP.

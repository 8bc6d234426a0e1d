//! The compute device: adapter selection, the pipeline cache, the buffer
//! pool, and a recorder that turns a whole forward pass into one submission.
//!
//! A `Gpu` is owned by one thread (the engine's); nothing here is shared.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::mpsc;

use wgpu::util::DeviceExt;

use crate::EngineError;

/// Which adapter to use when several are offered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterPreference {
    /// Use the first adapter whose name contains this (case-insensitive);
    /// otherwise a discrete GPU, then an integrated one, then a virtual one,
    /// then a CPU implementation such as lavapipe.
    pub name: Option<String>,
}

impl AdapterPreference {
    /// wgpu's own `WGPU_ADAPTER_NAME`, when set. (Backends follow
    /// `WGPU_BACKEND` inside wgpu itself.)
    pub fn from_env() -> Self {
        Self {
            name: std::env::var("WGPU_ADAPTER_NAME")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Ranks an adapter for [`AdapterPreference`]'s default order; lower is better.
fn rank(device_type: wgpu::DeviceType) -> u8 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Picks an adapter among `infos` (name, type); `None` when none fits.
fn choose(infos: &[(String, wgpu::DeviceType)], preference: &AdapterPreference) -> Option<usize> {
    if let Some(wanted) = &preference.name {
        let wanted = wanted.to_lowercase();
        return infos
            .iter()
            .position(|(name, _)| name.to_lowercase().contains(&wanted));
    }
    infos
        .iter()
        .enumerate()
        .min_by_key(|(_, (_, device_type))| rank(*device_type))
        .map(|(index, _)| index)
}

/// A kernel's identity in the pipeline cache: name, variant, workgroup size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The kernel (its WGSL file).
    pub kernel: &'static str,
    /// The variant, as set by override constants.
    pub variant: &'static str,
    /// The workgroup size the WGSL declares.
    pub workgroup_size: u32,
}

/// A kernel to run: its key, its source, and the override constants that
/// make its variant.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// Cache key.
    pub key: PipelineKey,
    /// WGSL source.
    pub source: &'static str,
    /// Pipeline-overridable constants of this variant.
    pub constants: &'static [(&'static str, f64)],
}

/// Usage of every pooled storage buffer.
const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);
const READBACK: wgpu::BufferUsages =
    wgpu::BufferUsages::MAP_READ.union(wgpu::BufferUsages::COPY_DST);
const UNIFORM: wgpu::BufferUsages = wgpu::BufferUsages::UNIFORM.union(wgpu::BufferUsages::COPY_DST);

/// The device, its queue, and what is cached on it.
pub struct Gpu {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter it came from.
    pub info: wgpu::AdapterInfo,
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    pool: HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>,
    textures: HashMap<(u32, u32), Vec<wgpu::Texture>>,
    uniform_align: u64,
    max_texture_rows: u32,
    /// Rows per block of a matrix copied into a texture (the texture
    /// limit, lowered in tests).
    max_block_rows: u32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .finish()
    }
}

impl Gpu {
    /// Opens a device on the preferred adapter and logs what it offers.
    pub fn new(preference: &AdapterPreference) -> Result<Self, EngineError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
        if infos.is_empty() {
            return Err(EngineError::NoAdapter(
                "wgpu found no adapter (install mesa-vulkan-drivers for lavapipe: scripts/setup.sh)".into(),
            ));
        }
        let named: Vec<(String, wgpu::DeviceType)> = infos
            .iter()
            .map(|i| (i.name.clone(), i.device_type))
            .collect();
        let index = choose(&named, preference).ok_or_else(|| {
            EngineError::NoAdapter(format!(
                "no adapter named like {:?} among {:?}",
                preference.name.as_deref().unwrap_or_default(),
                infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>()
            ))
        })?;
        let adapter = &adapters[index];
        let info = infos[index].clone();
        let limits = adapter.limits();
        tracing::info!(
            adapter = %info.name,
            backend = ?info.backend,
            device_type = ?info.device_type,
            driver = %info.driver_info,
            max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size,
            max_buffer_size = limits.max_buffer_size,
            max_compute_workgroups_per_dimension = limits.max_compute_workgroups_per_dimension,
            max_compute_invocations_per_workgroup = limits.max_compute_invocations_per_workgroup,
            max_texture_dimension_2d = limits.max_texture_dimension_2d,
            features = ?adapter.features(),
            "local engine adapter"
        );
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("infermesh-fallback"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| EngineError::NoAdapter(format!("{}: {e}", info.name)))?;
        Ok(Self {
            device,
            queue,
            info,
            modules: HashMap::new(),
            pipelines: HashMap::new(),
            pool: HashMap::new(),
            textures: HashMap::new(),
            uniform_align: u64::from(limits.min_uniform_buffer_offset_alignment).max(16),
            max_texture_rows: limits.max_texture_dimension_2d,
            max_block_rows: limits.max_texture_dimension_2d,
        })
    }

    /// The cached pipeline of `kernel`, created (and validated) on first use.
    pub fn pipeline(&mut self, kernel: &Kernel) -> Result<wgpu::ComputePipeline, EngineError> {
        if let Some(pipeline) = self.pipelines.get(&kernel.key) {
            return Ok(pipeline.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = match self.modules.get(kernel.key.kernel) {
            Some(module) => module.clone(),
            None => {
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.key.kernel),
                    source: wgpu::ShaderSource::Wgsl(kernel.source.into()),
                };
                let module = self.device.create_shader_module(desc);
                self.modules.insert(kernel.key.kernel, module.clone());
                module
            }
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.key.kernel),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: kernel.constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(error) = pollster::block_on(scope.pop()) {
            self.modules.remove(kernel.key.kernel);
            return Err(EngineError::Gpu(format!(
                "kernel {}/{}: {error}",
                kernel.key.kernel, kernel.key.variant
            )));
        }
        self.pipelines.insert(kernel.key, pipeline.clone());
        Ok(pipeline)
    }

    /// A storage buffer of at least `bytes` from the pool.
    pub fn acquire(&mut self, bytes: u64) -> wgpu::Buffer {
        self.acquire_with(bytes, STORAGE)
    }

    fn acquire_with(&mut self, bytes: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        // Power-of-two classes keep the pool small across batch shapes.
        let size = bytes.max(256).next_power_of_two();
        if let Some(buffer) = self.pool.get_mut(&(size, usage)).and_then(Vec::pop) {
            return buffer;
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("pooled"),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Returns a buffer to the pool once the work that used it is done.
    pub fn release(&mut self, buffer: wgpu::Buffer) {
        self.pool
            .entry((buffer.size(), buffer.usage()))
            .or_default()
            .push(buffer);
    }

    /// A storage buffer holding `data`, for weights that live as long as the model.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(data),
                usage: STORAGE,
            })
    }

    /// A pooled storage buffer filled with `data` before the next submission.
    pub fn stage<T: bytemuck::Pod>(&mut self, data: &[T]) -> wgpu::Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buffer = self.acquire(bytes.len() as u64);
        if !bytes.is_empty() {
            self.queue.write_buffer(&buffer, 0, bytes);
        }
        buffer
    }

    /// The most rows of a matrix one scratch texture holds.
    pub fn max_block_rows(&self) -> u32 {
        self.max_block_rows
    }

    /// Splits `rows` rows, in whole units of `unit` rows (a sequence, say),
    /// into blocks no taller than [`Gpu::max_block_rows`]: (first row, rows)
    /// of each, in order. The first block is the tallest.
    pub fn row_blocks(&self, rows: u32, unit: u32) -> Result<Vec<(u32, u32)>, EngineError> {
        let unit = unit.max(1);
        let block = self.max_block_rows / unit * unit;
        if block == 0 {
            return Err(EngineError::Gpu(format!(
                "a unit of {unit} rows is taller than the adapter's texture limit of {} rows",
                self.max_block_rows
            )));
        }
        Ok((0..rows.div_ceil(block))
            .map(|i| (i * block, block.min(rows - i * block)))
            .collect())
    }

    /// Lowers [`Gpu::max_block_rows`], so tests can exercise row blocks.
    #[cfg(test)]
    pub(crate) fn limit_block_rows(&mut self, rows: u32) {
        self.max_block_rows = rows;
    }

    /// A row-major `f32` matrix of `rows` × `4 * width` as an RGBA32F
    /// texture of `width` × `rows` texels, for weights that live as long as
    /// the model. Kernels bind it as a read-only storage texture and read it
    /// with `textureLoad`, one vec4 per texel.
    pub fn upload_matrix(
        &self,
        label: &str,
        data: &[f32],
        width: u32,
        rows: u32,
    ) -> Result<wgpu::Texture, EngineError> {
        if data.len() != 4 * width as usize * rows as usize {
            return Err(EngineError::Gpu(format!(
                "{label}: {} values do not make {rows} rows of {width} vec4",
                data.len()
            )));
        }
        if width > self.max_texture_rows || rows > self.max_texture_rows {
            return Err(EngineError::Gpu(format!(
                "{label}: {width} x {rows} texels exceed the adapter's 2D texture limit of {}",
                self.max_texture_rows
            )));
        }
        Ok(self.device.create_texture_with_data(
            &self.queue,
            &matrix_descriptor(label, width, rows),
            wgpu::util::TextureDataOrder::LayerMajor,
            bytemuck::cast_slice(data),
        ))
    }

    /// A pooled matrix texture of `width` vec4 by at least `rows` rows.
    pub fn acquire_matrix(&mut self, width: u32, rows: u32) -> wgpu::Texture {
        let height = rows.max(16).next_power_of_two().min(self.max_block_rows);
        if let Some(texture) = self.textures.get_mut(&(width, height)).and_then(Vec::pop) {
            return texture;
        }
        self.device
            .create_texture(&matrix_descriptor("pooled", width, height))
    }

    /// Returns a matrix texture to the pool.
    pub fn release_matrix(&mut self, texture: wgpu::Texture) {
        self.textures
            .entry((texture.width(), texture.height()))
            .or_default()
            .push(texture);
    }

    /// Starts recording a pass; `dispatches` is a capacity hint.
    pub fn recorder(&mut self, dispatches: usize) -> Recorder {
        Recorder {
            commands: Vec::with_capacity(dispatches),
            params: Vec::with_capacity((self.uniform_align as usize) * dispatches),
            slot: self.uniform_align,
            scratch: Vec::new(),
        }
    }

    /// Submits everything recorded, copies `bytes` of `output` back, and
    /// waits for it: one submission per call.
    pub fn finish(
        &mut self,
        recorder: Recorder,
        output: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<f32>, EngineError> {
        let Recorder {
            commands,
            params,
            scratch,
            ..
        } = recorder;
        let uniforms = self.acquire_with(params.len() as u64, UNIFORM);
        if !params.is_empty() {
            self.queue.write_buffer(&uniforms, 0, &params);
        }
        let readback = self.acquire_with(bytes, READBACK);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("forward"),
            });
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        for command in &commands {
            match command {
                Command::Dispatch(dispatch) => {
                    let mut entries: Vec<wgpu::BindGroupEntry<'_>> = dispatch
                        .bindings
                        .iter()
                        .enumerate()
                        .map(|(binding, resource)| wgpu::BindGroupEntry {
                            binding: binding as u32,
                            resource: resource.as_binding(),
                        })
                        .collect();
                    entries.push(wgpu::BindGroupEntry {
                        binding: dispatch.bindings.len() as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &uniforms,
                            offset: dispatch.params_offset,
                            size: NonZeroU64::new(dispatch.params_size),
                        }),
                    });
                    let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("dispatch"),
                        layout: &dispatch.pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    });
                    let pass = pass.get_or_insert_with(|| {
                        encoder
                            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                                label: Some("forward"),
                                timestamp_writes: None,
                            })
                            .forget_lifetime()
                    });
                    pass.set_pipeline(&dispatch.pipeline);
                    pass.set_bind_group(0, &bind_group, &[]);
                    let [x, y, z] = dispatch.workgroups;
                    pass.dispatch_workgroups(x, y, z);
                }
                Command::Copy {
                    buffer,
                    offset,
                    texture,
                    width,
                    rows,
                } => {
                    // A copy ends the compute pass; the next dispatch opens another.
                    pass = None;
                    encoder.copy_buffer_to_texture(
                        wgpu::TexelCopyBufferInfo {
                            buffer,
                            layout: wgpu::TexelCopyBufferLayout {
                                offset: *offset,
                                bytes_per_row: Some(width * 16),
                                rows_per_image: Some(*rows),
                            },
                        },
                        texture.as_image_copy(),
                        wgpu::Extent3d {
                            width: *width,
                            height: *rows,
                            depth_or_array_layers: 1,
                        },
                    );
                }
            }
        }
        drop(pass);
        encoder.copy_buffer_to_buffer(output, 0, &readback, 0, bytes);
        let submission = self.queue.submit([encoder.finish()]);
        let (tx, rx) = mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, 0..bytes, move |result| {
            let _ = tx.send(result);
        });
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: None,
            })
            .map_err(|e| EngineError::Gpu(format!("waiting for the forward pass: {e}")))?;
        let mapped = rx
            .recv()
            .map_err(|_| EngineError::Gpu("readback callback never ran".into()))?
            .map_err(|e| EngineError::Gpu(format!("mapping the result: {e}")));
        let values = match mapped {
            Ok(()) => {
                let view = readback
                    .get_mapped_range(0..bytes)
                    .map_err(|e| EngineError::Gpu(format!("reading the result: {e}")))?;
                let values = bytemuck::pod_collect_to_vec::<u8, f32>(&view);
                drop(view);
                readback.unmap();
                Ok(values)
            }
            Err(e) => Err(e),
        };
        self.release(readback);
        self.release(uniforms);
        for (_, texture) in scratch {
            self.release_matrix(texture);
        }
        values
    }
}

fn matrix_descriptor(label: &str, width: u32, rows: u32) -> wgpu::TextureDescriptor<'_> {
    wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d {
            width,
            height: rows,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Float,
        usage: wgpu::TextureUsages::STORAGE_BINDING.union(wgpu::TextureUsages::COPY_DST),
        view_formats: &[],
    }
}

/// What a kernel binds, in binding order (its parameters come last).
#[derive(Debug, Clone)]
pub enum Bind {
    /// A whole storage buffer.
    Buffer(wgpu::Buffer),
    /// A matrix texture (see [`Gpu::upload_matrix`]).
    Matrix(wgpu::TextureView),
}

impl Bind {
    fn as_binding(&self) -> wgpu::BindingResource<'_> {
        match self {
            Bind::Buffer(buffer) => buffer.as_entire_binding(),
            Bind::Matrix(view) => wgpu::BindingResource::TextureView(view),
        }
    }
}

struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bindings: Vec<Bind>,
    params_offset: u64,
    params_size: u64,
    workgroups: [u32; 3],
}

enum Command {
    Dispatch(Dispatch),
    /// Rows of a buffer into a matrix texture.
    Copy {
        buffer: wgpu::Buffer,
        offset: u64,
        texture: wgpu::Texture,
        width: u32,
        rows: u32,
    },
}

/// Commands recorded for one submission, with their parameters packed in
/// one uniform buffer.
pub struct Recorder {
    commands: Vec<Command>,
    params: Vec<u8>,
    slot: u64,
    /// Pooled textures used by this pass, by slot, returned when it is
    /// finished.
    scratch: Vec<(usize, wgpu::Texture)>,
}

impl Recorder {
    /// Records `kernel` over `buffers` (bindings 0..n in order) with
    /// `params` as the uniform at binding n, over `invocations` one-dimensional
    /// invocations (split into a 2D grid past the per-dimension limit).
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        gpu: &mut Gpu,
        kernel: &Kernel,
        buffers: &[&wgpu::Buffer],
        params: &P,
        invocations: u32,
    ) -> Result<(), EngineError> {
        let groups = invocations.div_ceil(kernel.key.workgroup_size).max(1);
        self.dispatch_groups(gpu, kernel, buffers, params, groups)
    }

    /// As [`Recorder::dispatch`], counting workgroups instead of invocations.
    pub fn dispatch_groups<P: bytemuck::Pod>(
        &mut self,
        gpu: &mut Gpu,
        kernel: &Kernel,
        buffers: &[&wgpu::Buffer],
        params: &P,
        groups: u32,
    ) -> Result<(), EngineError> {
        let bindings = buffers.iter().map(|b| Bind::Buffer((*b).clone())).collect();
        self.dispatch_bound(gpu, kernel, bindings, params, groups)
    }

    /// As [`Recorder::dispatch_groups`], binding buffers and textures.
    pub fn dispatch_bound<P: bytemuck::Pod>(
        &mut self,
        gpu: &mut Gpu,
        kernel: &Kernel,
        bindings: Vec<Bind>,
        params: &P,
        groups: u32,
    ) -> Result<(), EngineError> {
        let offset = self.params.len() as u64;
        let bytes = bytemuck::bytes_of(params);
        self.params.extend_from_slice(bytes);
        self.params.resize((offset + self.slot) as usize, 0);
        let pipeline = gpu.pipeline(kernel)?;
        // WebGPU's per-dimension limit is 65535 workgroups.
        const MAX: u32 = 65_535;
        let workgroups = if groups <= MAX {
            [groups, 1, 1]
        } else {
            [MAX, groups.div_ceil(MAX), 1]
        };
        self.commands.push(Command::Dispatch(Dispatch {
            pipeline,
            bindings,
            params_offset: offset,
            params_size: bytes.len() as u64,
            workgroups,
        }));
        Ok(())
    }

    /// A matrix texture of `width` vec4 by at least `rows` rows for this
    /// pass, and the view kernels bind, returned to the pool when the pass
    /// is finished. Kernels that bind two at once ask for different
    /// `slot`s; otherwise products of the same width share one: commands
    /// run in order, so each copy into it waits for the dispatch before it.
    pub fn scratch_matrix(
        &mut self,
        gpu: &mut Gpu,
        slot: usize,
        width: u32,
        rows: u32,
    ) -> (wgpu::Texture, wgpu::TextureView) {
        let texture = match self
            .scratch
            .iter()
            .find(|(s, t)| *s == slot && t.width() == width && t.height() >= rows)
        {
            Some((_, texture)) => texture.clone(),
            None => {
                let texture = gpu.acquire_matrix(width, rows);
                self.scratch.push((slot, texture.clone()));
                texture
            }
        };
        let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
        (texture, view)
    }

    /// Records a copy of `rows` rows of a row-major matrix as wide as
    /// `texture` (in vec4), starting at row `first_row` of `buffer`, into
    /// the top of `texture`. Rows must be a multiple of 256 bytes (the
    /// texture's width a multiple of 16).
    pub fn copy_to_matrix(
        &mut self,
        buffer: &wgpu::Buffer,
        first_row: u32,
        texture: &wgpu::Texture,
        rows: u32,
    ) -> Result<(), EngineError> {
        let width = texture.width();
        if !width.is_multiple_of(16) {
            return Err(EngineError::Gpu(format!(
                "a matrix row of {width} vec4 is not a multiple of 256 bytes"
            )));
        }
        self.commands.push(Command::Copy {
            buffer: buffer.clone(),
            offset: u64::from(first_row) * u64::from(width) * 16,
            texture: texture.clone(),
            width,
            rows,
        });
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The test device: any adapter, failing loudly when there is none.
    pub(crate) fn gpu() -> Gpu {
        match Gpu::new(&AdapterPreference::default()) {
            Ok(gpu) => gpu,
            Err(e) => panic!("{e}; run scripts/setup.sh to install lavapipe"),
        }
    }

    fn info(name: &str, device_type: wgpu::DeviceType) -> (String, wgpu::DeviceType) {
        (name.to_string(), device_type)
    }

    #[test]
    fn a_real_gpu_is_preferred_to_lavapipe_unless_named() {
        let infos = [
            info("llvmpipe (LLVM 15.0.6, 256 bits)", wgpu::DeviceType::Cpu),
            info("NVIDIA L4", wgpu::DeviceType::DiscreteGpu),
        ];
        assert_eq!(choose(&infos, &AdapterPreference::default()), Some(1));
        let llvmpipe = AdapterPreference {
            name: Some("LLVMPIPE".into()),
        };
        assert_eq!(choose(&infos, &llvmpipe), Some(0));
        let absent = AdapterPreference {
            name: Some("radeon".into()),
        };
        assert_eq!(choose(&infos, &absent), None);
        assert_eq!(choose(&[], &AdapterPreference::default()), None);
    }
}

"""The worker's step loop, compiled.

For each env of a STEP request: its action out of shared memory, ``env.step`` (the only
Python left), then its observation, reward and flags into the ring slot. An observation
leaf that is a C-contiguous array of exactly the leaf's dtype and shape (what a raster env
returns) is one memcpy, without the GIL for large rows; anything else (a Python scalar, a
strided view, another dtype) goes through ``layout.write_leaf``, which checks and casts
exactly as before. Rewards and flags are converted the way numpy's item assignment does
(``float(x)``, ``bool(x)``), so results stay those of SyncVectorEnv.

The kernel serves requests whose every leaf has a fixed size and whose actions all came
through shared memory; anything else takes ``Worker.on_step``'s Python path.
"""
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from fastvec._ring cimport (FV_OP_CLOSE, FV_OP_STEP, FV_REQ_COUNTED, FV_REQ_NO_SPIN, FV_ST_OK,
                            Batch, Ctl, SemHandle, fv_ctl)

import numpy as np
from gymnasium.vector import AutoresetMode

from fastvec import infos as _infos
from fastvec.errors import SpaceMismatchError
from fastvec.layout import flatten, unflatten, write_leaf

cdef object _MISSING = object()

cdef object _ndarray = np.ndarray
# Rows at least this large are copied with the GIL released (a worker's heartbeat and
# the env's own threads may want it); smaller ones are not worth the hand-off.
cdef Py_ssize_t _NOGIL_BYTES = 16384


cdef class _ObsLeaf:
    cdef object leaf          # layout.Leaf
    cdef object region        # the numpy region [depth][num_envs][*shape]
    cdef unsigned char[::1] raw
    cdef Py_ssize_t row_bytes, num_envs
    cdef object dtype, shape

    def __cinit__(self, leaf, region):
        self.leaf = leaf
        self.region = region
        self.raw = region.reshape(-1).view(np.uint8)
        self.num_envs = region.shape[1]
        self.row_bytes = region.dtype.itemsize
        for s in region.shape[2:]:
            self.row_bytes *= s
        self.dtype = region.dtype
        self.shape = tuple(leaf.shape)

    cdef int write(self, object value, Py_ssize_t ring, Py_ssize_t i) except -1:
        cdef Py_buffer b
        cdef char *dst
        if (type(value) is _ndarray and (value.dtype is self.dtype or value.dtype == self.dtype)
                and value.shape == self.shape):
            try:
                PyObject_GetBuffer(value, &b, PyBUF_C_CONTIGUOUS)
            except (BufferError, ValueError):
                pass  # strided: the checked path below copies it
            else:
                try:
                    if b.len == self.row_bytes:
                        dst = <char *>&self.raw[0] + (ring * self.num_envs + i) * self.row_bytes
                        if self.row_bytes >= _NOGIL_BYTES:
                            with nogil:
                                memcpy(dst, b.buf, self.row_bytes)
                        else:
                            memcpy(dst, b.buf, self.row_bytes)
                        return 0
                finally:
                    PyBuffer_Release(&b)
        write_leaf(self.region[ring, i, ...], self.leaf, value)
        return 0


cdef class InfoWriter:
    """The worker's side of the typed info columns (fastvec/infos.py): for each env's
    reply, the values of the schema's keys (exact type only) into their columns, presence
    bytes set or cleared; returns what is left of the dict to pickle (None: nothing)."""

    cdef uint64_t[::1] version
    cdef object blob
    cdef int64_t[:, :, ::1] ivals
    cdef double[:, :, ::1] fvals
    cdef unsigned char[:, :, ::1] present
    cdef object arena
    cdef uint64_t seen
    cdef list keys, types, shapes, dtypes, arrays
    cdef list kinds
    cdef dict index
    cdef Py_ssize_t n

    def __cinit__(self, views):
        self.version = views.info_version
        self.blob = views.info_blob
        self.ivals = views.info_values
        self.fvals = views.info_values.view(np.float64)
        self.present = views.info_present
        self.arena = views.info_arrays
        self.seen = 0
        self.keys, self.types, self.shapes, self.dtypes, self.arrays = [], [], [], [], []
        self.kinds, self.index, self.n = [], {}, 0

    def release(self):
        self.version = None
        self.blob = None
        self.ivals = None
        self.fvals = None
        self.present = None
        self.arena = None
        self.arrays = []

    cdef int _load(self) except -1:
        schema = _infos.decode_schema(self.blob)
        self.keys = [k for k, _, _, _ in schema]
        self.types = [t for _, t, _, _ in schema]
        self.shapes = [shape for _, _, shape, _ in schema]
        self.kinds = [_infos.kind_of(t) for t in self.types]
        self.dtypes = [np.dtype(t) for t in self.types]
        self.arrays = [None if shape is None else _infos.array_view(self.arena, off, t, shape)
                       for _, t, shape, off in schema]
        self.index = {k: c for c, k in enumerate(self.keys)}
        self.n = len(schema)
        self.seen = self.version[0]
        return 0

    cpdef object write(self, Py_ssize_t ring, Py_ssize_t i, object info):
        cdef Py_ssize_t c, taken = 0
        cdef unsigned char *p
        if self.version[0] != self.seen:
            self._load()
        if self.n == 0:
            return info if info else None
        p = &self.present[ring, i, 0]
        memset(p, 0, self.n)
        if not info or type(info) is not dict:
            return info if info else None
        for c in range(self.n):
            v = (<dict>info).get(self.keys[c], _MISSING)
            if v is _MISSING:
                continue
            shape = self.shapes[c]
            if shape is not None:  # an array column: exactly its dtype and shape
                if (type(v) is not _ndarray or v.shape != shape
                        or v.dtype != self.dtypes[c]):
                    continue
                self.arrays[c][ring, i] = v
            elif type(v) is not self.types[c]:
                continue
            else:
                try:
                    if self.kinds[c] == 1:
                        self.fvals[ring, i, c] = v
                    else:
                        self.ivals[ring, i, c] = v
                except OverflowError:  # an int beyond int64: it travels pickled
                    continue
            p[c] = 1
            taken += 1
        if taken == 0:
            return info
        if taken == len(<dict>info):
            return None
        return {k: v for k, v in (<dict>info).items()
                if not (k in self.index and p[<Py_ssize_t>self.index[k]])}


cdef class StepKernel:
    """One worker's STEP handler for spaces whose leaves all have a fixed size."""

    cdef object worker
    cdef list envs
    cdef tuple env_indices
    cdef int mode  # 0 NEXT_STEP, 1 SAME_STEP, 2 DISABLED
    cdef list obs
    cdef bint obs_single
    cdef object obs_space
    cdef list act
    cdef bint act_single, act_scalar
    cdef object act_space
    cdef double[:, ::1] reward
    cdef unsigned char[:, ::1] terminated, truncated
    cdef object ctl
    cdef InfoWriter infos
    cdef bint snapshots  # worker.stepped(j) after each step (snapshot_every)

    def __cinit__(self, worker, views, obs_leaves, act_leaves, obs_space, act_space,
                  InfoWriter info_writer):
        self.worker = worker
        self.infos = info_writer
        self.env_indices = tuple(worker.spec.env_indices)
        mode = AutoresetMode(worker.spec.autoreset_mode)
        self.mode = (0 if mode == AutoresetMode.NEXT_STEP
                     else 1 if mode == AutoresetMode.SAME_STEP else 2)
        self.obs = [_ObsLeaf(leaf, region) for leaf, region in zip(obs_leaves, views.obs)]
        self.obs_single = len(obs_leaves) == 1 and obs_leaves[0].path == ()
        self.obs_space = obs_space
        self.act = list(views.act)
        self.act_single = len(act_leaves) == 1 and act_leaves[0].path == ()
        self.act_scalar = self.act_single and act_leaves[0].shape == ()
        self.act_space = act_space
        self.reward = views.reward
        self.terminated = views.terminated.view(np.uint8)
        self.truncated = views.truncated.view(np.uint8)
        self.ctl = worker.ctl
        self.snapshots = worker.snapshot_every > 0

    @staticmethod
    def supports(obs_leaves, act_leaves, views) -> bool:
        return (all(r is not None for r in views.obs) and all(a is not None for a in views.act)
                and not any(leaf.pickled for leaf in (*obs_leaves, *act_leaves)))

    def release(self):
        """Drop every view of the main segment, so that its mmap can be closed."""
        self.obs = []
        self.act = []
        self.reward = None
        self.terminated = None
        self.truncated = None

    cdef object _action(self, Py_ssize_t i):
        if self.act_scalar:
            return self.act[0][i]  # a numpy scalar: immutable, nothing to copy
        if self.act_single:
            return self.act[0][i].copy()
        return unflatten(self.act_space, [a[i].copy() for a in self.act])

    cdef int _write_obs(self, Py_ssize_t i, Py_ssize_t ring, object obs) except -1:
        cdef _ObsLeaf leaf
        try:
            if self.obs_single:
                (<_ObsLeaf>self.obs[0]).write(obs, ring, i)
            else:
                for leaf, value in zip(self.obs, flatten(self.obs_space, obs)):
                    leaf.write(value, ring, i)
        except SpaceMismatchError as exc:
            raise SpaceMismatchError(f"env {i} returned an observation that does not fit "
                                     f"{self.obs_space}: {exc}") from None
        return 0

    def step(self, Py_ssize_t ring):
        """Step every env of the worker into ring slot ``ring``; returns the per-env infos
        left to pickle (None where nothing is left) or None when nothing is left at all."""
        cdef Py_ssize_t j, i, k = len(self.worker.envs)
        cdef list envs = self.worker.envs
        cdef list autoreset = self.worker.autoreset
        cdef list infos = None
        cdef double r
        cdef bint term, trunc
        for j in range(k):
            i = self.env_indices[j]
            env = envs[j]
            if autoreset[j]:  # NEXT_STEP: this step is the reset
                obs, info = self.worker.reset_env(j, None)
                r, term, trunc = 0.0, False, False
                autoreset[j] = False
            else:
                obs, reward, terminated, truncated, info = env.step(self._action(i))
                if self.snapshots:
                    self.worker.stepped(j)
                r = reward  # float(reward), as numpy's item assignment converts it
                term = terminated
                trunc = truncated
                if term or trunc:
                    self.worker.episode_ended()
                    if self.mode == 0:
                        autoreset[j] = True
                    elif self.mode == 1:
                        final_obs, final_info = obs, info
                        obs, reset_info = self.worker.reset_env(j, None)
                        info = {"final_obs": final_obs, "final_info": final_info, **reset_info}
            self._write_obs(i, ring, obs)
            self.reward[ring, i] = r
            self.terminated[ring, i] = term
            self.truncated[ring, i] = trunc
            info = self.infos.write(ring, i, info)
            if info is not None:
                if infos is None:
                    infos = [None] * k
                infos[j] = info
        return infos


def serve(worker):
    """The worker's request loop: wait for a request, answer it, until CLOSE. A STEP that
    the compiled kernel can serve (every leaf fixed, no pickled actions) is read from the
    control block and answered here, Python running only ``env.step``; any other request
    goes to ``worker.handle``. (ring.c is linked into fastvec._ring only, so its calls go
    through Ctl's methods.)"""
    cdef Ctl ctl = worker.ctl
    cdef Batch batch = worker.batch
    cdef SemHandle req = worker.req_sem
    cdef SemHandle done = worker.done_sem
    cdef StepKernel kernel = worker.kernel
    cdef uint64_t spin = worker.spec.spin_ns
    cdef uint64_t seq = worker.spec.start_seq - 1
    cdef fv_ctl *c = ctl._p()
    cdef uint32_t flags, epoch
    cdef uint64_t n
    cdef list no_pickled = [None] * len(worker.envs)
    cdef uint64_t every_env = (1 << len(worker.envs)) - 1  # a masked step goes through handle
    while True:
        # the parent says whether a core is free for spinning (see Supervisor.spin_ns)
        seq = ctl.wait_request(req, seq, 0 if c.flags & FV_REQ_NO_SPIN else spin)
        if (kernel is not None and c.opcode == FV_OP_STEP and c.req_payload_len == 0
                and c.env_mask == every_env):
            flags, epoch = c.flags, c.batch_epoch
            ctl.begin()
            try:
                infos = kernel.step(c.ring_index)
                n = (0 if infos is None and worker.notes is None
                     else worker._put_reply(infos or no_pickled, no_pickled))
            except BaseException as exc:  # reported to the parent, which applies its policy
                worker.reply_error(seq, exc, flags & FV_REQ_COUNTED, epoch)
                continue
            ctl.reply(batch, done, seq, FV_ST_OK, n, flags, epoch)
        elif worker.handle(seq) == FV_OP_CLOSE:
            return

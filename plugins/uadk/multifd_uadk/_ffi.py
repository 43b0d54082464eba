"""cffi ABI-mode declarations of the parts of UADK's compression API this plugin uses.

They follow Linaro/uadk ``include/wd_comp.h``, ``wd_alg_common.h``, ``wd_sched.h`` and
``wd.h`` of UADK 2.x (libwd.so.2, libwd_comp.so.2), LP64 Linux. ``struct wd_comp_sess_setup``
is declared in its newest form (with ``mm_ops`` and ``mm_type``, UADK >= 2.9): the caller
allocates it zeroed, and a zeroed tail is what an older library ignores and a newer one
reads as its defaults (UADK_MEM_AUTO), so one declaration serves both. ``struct
sched_params`` is declared in its newest form too (``dev_id``, added in November 2025) and
allocated with zeroed spare room for the same reason. No UADK header is packaged in Debian 12
or 13; the layout was probed once against Linaro/uadk 97d643e (2026-05) with
``multifd_core.layout`` and is kept transcribed in the tests. Tests compare sizeof
and offsets with the headers' layout.
"""

from __future__ import annotations

import cffi

from multifd_core.native import LibrarySpec, OpenLibrary, open_library

HEADER_VERSION = "UADK 2.x wd_comp.h / wd_sched.h / wd_alg_common.h (Linaro/uadk)"

CDEF = """
typedef uintptr_t handle_t;
typedef uint8_t __u8;
typedef uint32_t __u32;

enum wd_comp_alg_type { WD_DEFLATE, WD_ZLIB, WD_GZIP, WD_LZ77_ZSTD, WD_LZ4, WD_LZ77_ONLY,
                        WD_COMP_ALG_MAX };
enum wd_comp_op_type { WD_DIR_COMPRESS, WD_DIR_DECOMPRESS, WD_DIR_MAX };
enum wd_comp_level { WD_COMP_L1 = 1, WD_COMP_L15 = 15 };
enum wd_comp_winsz_type { WD_COMP_WS_4K, WD_COMP_WS_8K, WD_COMP_WS_16K, WD_COMP_WS_24K,
                          WD_COMP_WS_32K };
enum wd_buff_type { WD_FLAT_BUF, WD_SGL_BUF };
enum wd_mem_type { UADK_MEM_AUTO, UADK_MEM_USER, UADK_MEM_PROXY };
enum sched_policy_type { SCHED_POLICY_RR = 0, SCHED_POLICY_NONE, SCHED_POLICY_SINGLE,
                         SCHED_POLICY_BUTT };
enum alg_task_type { TASK_MIX = 0, TASK_HW, TASK_INSTR, TASK_MAX_TYPE };

struct wd_datalist;
struct wd_ctx_params;
struct wd_comp_req;

struct wd_mm_ops {
    void *(*alloc)(void *usr, size_t size);
    void (*free)(void *usr, void *va);
    void *(*iova_map)(void *usr, void *va, size_t sz);
    void (*iova_unmap)(void *usr, void *va, void *dma, size_t sz);
    __u32 (*get_bufsize)(void *usr);
    void *usr;
    bool sva_mode;
};

struct wd_comp_sess_setup {
    enum wd_comp_alg_type alg_type;
    enum wd_comp_level comp_lv;
    enum wd_comp_winsz_type win_sz;
    enum wd_comp_op_type op_type;
    void *sched_param;
    struct wd_mm_ops mm_ops;
    enum wd_mem_type mm_type;
};

struct sched_params {
    int numa_id;
    __u8 type;
    __u8 mode;
    __u32 begin;
    __u32 end;
    __u32 dev_id;
};

struct wd_comp_req {
    union { void *src; struct wd_datalist *list_src; };
    __u32 src_len;
    union { void *dst; struct wd_datalist *list_dst; };
    __u32 dst_len;
    void *(*cb)(struct wd_comp_req *req, void *cb_param);
    void *cb_param;
    enum wd_comp_op_type op_type;
    enum wd_buff_type data_fmt;
    __u32 last;
    __u32 status;
    void *priv;
};

int wd_comp_init2_(char *alg, __u32 sched_type, int task_type,
                   struct wd_ctx_params *ctx_params);
void wd_comp_uninit2(void);
handle_t wd_comp_alloc_sess(struct wd_comp_sess_setup *setup);
void wd_comp_free_sess(handle_t h_sess);
int wd_do_comp_sync(handle_t h_sess, struct wd_comp_req *req);
"""

WD_EEXIST = 17  # wd.h: WD_EEXIST is EEXIST; wd_comp_init2 returns its negative
SCHED_PARAMS_ROOM = 64  # bytes allocated for struct sched_params (zeroed spare room)

ffi = cffi.FFI()
ffi.cdef(CDEF)

SPEC = LibrarySpec(
    label="libwd_comp",
    env="MULTIFD_UADK_LIBRARY",
    find_name="wd_comp",
    sonames=("libwd_comp.so.2", "libwd_comp.so"),
    dependencies=("libwd.so.2", "libwd.so"),
    symbols=("wd_comp_init2_", "wd_comp_uninit2", "wd_comp_alloc_sess", "wd_comp_free_sess",
             "wd_do_comp_sync"),
    install=("Install UADK (github.com/Linaro/uadk; openEuler packages it as libwd) on a "
             "host with a HiSilicon ZIP accelerator (Kunpeng 920); Debian 12/13 do not "
             "package it."),
)


def load() -> OpenLibrary:
    """The opened libwd_comp (raises LibraryNotFoundError)."""
    opened = open_library(SPEC, ffi)
    opened.ready = True
    return opened

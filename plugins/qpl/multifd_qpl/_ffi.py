"""cffi ABI-mode declarations of the parts of Intel QPL's C API this plugin uses.

They follow intel/qpl ``include/qpl/c_api/job.h``, ``defs.h``, ``status.h`` and
``statistics.h`` of QPL 1.x (job layout as in the 1.x releases QEMU builds against, index
copy of commit 06c1d51), LP64 Linux. ``qpl_job`` is declared whole because cffi's ABI mode
needs exact layouts; the library allocates more than ``sizeof(qpl_job)`` (its internal
buffers follow), so jobs are always allocated with ``qpl_get_job_size`` bytes. The fields
this plugin touches (``next_in_ptr`` ... ``level``, ``total_out``) form the struct's stable
prefix. No QPL header is packaged in Debian 12 or 13, so the tests compare sizeof and offsets
with a transcribed layout; ``multifd_core.layout`` probed it once against intel/qpl 117ec5b
(2024-10): all 56 figures match. With ``MULTIFD_QPL_HEADER`` (or ``/usr/include/qpl/qpl.h``)
the tests probe the real header too.
"""

from __future__ import annotations

import cffi

from multifd_core.native import LibrarySpec, OpenLibrary, open_library

HEADER_VERSION = "Intel QPL 1.x c_api/job.h (intel/qpl 06c1d51)"

CDEF = """
typedef enum { qpl_path_auto = 0, qpl_path_hardware = 1, qpl_path_software = 2 } qpl_path_t;
typedef enum { qpl_ow_nom = 0, qpl_ow_8 = 1, qpl_ow_16 = 2, qpl_ow_32 = 3 } qpl_out_format;
typedef enum {
    qpl_p_le_packed_array = 0, qpl_p_be_packed_array = 1, qpl_p_parquet_rle = 2
} qpl_parser;
typedef enum { qpl_op_decompress = 0, qpl_op_compress = 1 } qpl_operation;
typedef enum {
    qpl_mblk_size_none = 0, qpl_mblk_size_512, qpl_mblk_size_1k, qpl_mblk_size_2k,
    qpl_mblk_size_4k, qpl_mblk_size_8k, qpl_mblk_size_16k, qpl_mblk_size_32k
} qpl_mini_block_size;
typedef enum { qpl_level_1 = 1, qpl_level_3 = 3 } qpl_compression_levels;
typedef enum { qpl_compression_mode = 0, qpl_gathering_mode = 1 } qpl_statistics_mode;
typedef enum {
    QPL_STS_OK = 0, QPL_STS_BEING_PROCESSED = 1, QPL_STS_MORE_OUTPUT_NEEDED = 2,
    QPL_STS_QUEUES_ARE_BUSY_ERR = 5, QPL_INIT_HW_NOT_SUPPORTED = 500,
    QPL_STS_INIT_WORK_QUEUES_NOT_AVAILABLE = 503
} qpl_status;

typedef struct qpl_huffman_table *qpl_huffman_table_t;
typedef struct qpl_dictionary_s qpl_dictionary;

struct qpl_aux_data {
    uint8_t *compress_state_ptr;
    uint8_t *decompress_state_ptr;
    uint8_t *analytics_state_ptr;
    uint8_t *middle_layer_buffer_ptr;
    uint8_t *hw_state_ptr;
    qpl_path_t path;
};
typedef struct qpl_aux_data qpl_data;

typedef struct {
    uint8_t *next_in_ptr;
    uint32_t available_in;
    uint32_t total_in;
    uint8_t *next_out_ptr;
    uint32_t available_out;
    uint32_t total_out;
    qpl_operation op;
    uint32_t flags;
    uint32_t crc;
    uint32_t xor_checksum;
    uint32_t last_bit_offset;
    qpl_compression_levels level;
    qpl_statistics_mode statistics_mode;
    qpl_huffman_table_t huffman_table;
    qpl_dictionary *dictionary;
    qpl_mini_block_size mini_block_size;
    uint64_t *idx_array;
    uint32_t idx_max_size;
    uint32_t idx_num_written;
    uint8_t decomp_end_processing;
    uint8_t ignore_start_bits;
    uint8_t ignore_end_bits;
    uint64_t crc64_poly;
    uint64_t crc64;
    uint8_t *next_src2_ptr;
    uint32_t available_src2;
    uint32_t src1_bit_width;
    uint32_t src2_bit_width;
    uint32_t num_input_elements;
    qpl_out_format out_bit_width;
    uint32_t param_low;
    uint32_t param_high;
    uint32_t drop_initial_bytes;
    uint32_t initial_output_index;
    qpl_parser parser;
    uint32_t first_index_min_value;
    uint32_t last_index_max_value;
    uint32_t sum_value;
    int32_t numa_id;
    qpl_data data_ptr;
} qpl_job;

qpl_status qpl_get_job_size(qpl_path_t qpl_path, uint32_t *job_size_ptr);
qpl_status qpl_init_job(qpl_path_t qpl_path, qpl_job *qpl_job_ptr);
qpl_status qpl_execute_job(qpl_job *qpl_job_ptr);
qpl_status qpl_submit_job(qpl_job *qpl_job_ptr);
qpl_status qpl_wait_job(qpl_job *qpl_job_ptr);
qpl_status qpl_fini_job(qpl_job *qpl_job_ptr);
const char *qpl_get_library_version(void);
"""

# defs.h flags
QPL_FLAG_FIRST = 0x0001
QPL_FLAG_LAST = 0x0002
QPL_FLAG_OMIT_VERIFY = 0x4000
QPL_STS_OK = 0
QPL_STS_QUEUES_ARE_BUSY_ERR = 5

ffi = cffi.FFI()
ffi.cdef(CDEF)

def library_version(lib: object, ffi: cffi.FFI) -> str | None:
    """libqpl's own version string (``qpl_get_library_version``; QPL >= 1.1)."""
    return ffi.string(lib.qpl_get_library_version()).decode() or None


SPEC = LibrarySpec(
    label="libqpl",
    env="MULTIFD_QPL_LIBRARY",
    find_name="qpl",
    sonames=("libqpl.so.1", "libqpl.so"),
    dependencies=("libaccel-config.so.1",),
    symbols=("qpl_get_job_size", "qpl_init_job", "qpl_submit_job", "qpl_wait_job",
             "qpl_execute_job", "qpl_fini_job"),
    install=("Install Intel QPL built as a shared library (github.com/intel/qpl, cmake "
             "-DQPL_LIBRARY_TYPE=SHARED) and accel-config for IAA devices; Debian 12/13 do "
             "not package it."),
    version=library_version,
)


def load() -> OpenLibrary:
    """The opened libqpl (raises LibraryNotFoundError)."""
    opened = open_library(SPEC, ffi)
    opened.ready = True
    return opened

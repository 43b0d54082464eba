"""cffi ABI-mode declarations of the parts of QATzip's C API this plugin uses.

They follow ``qatzip.h`` of QATzip 1.3.1 (``QATZIP_API_VERSION`` 2.5; Debian package
libqatzip-dev 1.3.1-2, library ``libqatzip.so.3``), built without ``ERR_INJECTION``, for LP64
Linux. Only whole structs whose layout QATzip fixes are declared; tests compare ``sizeof`` and
field offsets with that header.
"""

from __future__ import annotations

import cffi

from multifd_core.native import LibrarySpec, OpenLibrary, open_library

HEADER_VERSION = "QATzip 1.3.1 qatzip.h (API 2.5)"

CDEF = """
typedef enum QzHuffmanHdr_E { QZ_DYNAMIC_HDR = 0, QZ_STATIC_HDR } QzHuffmanHdr_T;
typedef enum PinMem_E { COMMON_MEM = 0, PINNED_MEM } PinMem_T;
typedef enum QzDirection_E { QZ_DIR_COMPRESS = 0, QZ_DIR_DECOMPRESS, QZ_DIR_BOTH } QzDirection_T;
typedef enum QzDataFormat_E {
    QZ_DEFLATE_4B = 0, QZ_DEFLATE_GZIP, QZ_DEFLATE_GZIP_EXT, QZ_DEFLATE_RAW, QZ_FMT_NUM
} QzDataFormat_T;
typedef enum QzPollingMode_E { QZ_PERIODICAL_POLLING = 0, QZ_BUSY_POLLING } QzPollingMode_T;
typedef enum QzLogLevel_E {
    LOG_NONE = 0, LOG_FATAL, LOG_ERROR, LOG_WARNING, LOG_INFO, LOG_DEBUG1, LOG_DEBUG2, LOG_DEBUG3
} QzLogLevel_T;

typedef struct QzSession_S {
    signed long int hw_session_stat;
    int thd_sess_stat;
    void *internal;
    unsigned long total_in;
    unsigned long total_out;
} QzSession_T;

typedef struct QzSessionParamsCommon_S {
    QzDirection_T direction;
    unsigned int comp_lvl;
    unsigned char comp_algorithm;
    unsigned int max_forks;
    unsigned char sw_backup;
    unsigned int hw_buff_sz;
    unsigned int strm_buff_sz;
    unsigned int input_sz_thrshold;
    unsigned int req_cnt_thrshold;
    unsigned int wait_cnt_thrshold;
    QzPollingMode_T polling_mode;
    unsigned int is_sensitive_mode;
} QzSessionParamsCommon_T;

typedef struct QzSessionParamsDeflate_S {
    QzSessionParamsCommon_T common_params;
    QzHuffmanHdr_T huffman_hdr;
    QzDataFormat_T data_fmt;
} QzSessionParamsDeflate_T;

typedef struct QzStatus_S {
    unsigned short int qat_hw_count;
    unsigned char qat_service_init;
    unsigned char qat_mem_drvr;
    unsigned char qat_instance_attach;
    unsigned long int memory_alloced;
    unsigned char using_huge_pages;
    signed long int hw_session_status;
    unsigned char algo_sw[255];
    unsigned char algo_hw[255];
} QzStatus_T;

QzLogLevel_T qzSetLogLevel(QzLogLevel_T level);
int qzInit(QzSession_T *sess, unsigned char sw_backup);
int qzGetDefaultsDeflate(QzSessionParamsDeflate_T *defaults);
int qzSetupSessionDeflate(QzSession_T *sess, QzSessionParamsDeflate_T *params);
int qzCompress(QzSession_T *sess, const unsigned char *src, unsigned int *src_len,
               unsigned char *dest, unsigned int *dest_len, unsigned int last);
int qzDecompress(QzSession_T *sess, const unsigned char *src, unsigned int *src_len,
                 unsigned char *dest, unsigned int *dest_len);
int qzTeardownSession(QzSession_T *sess);
int qzClose(QzSession_T *sess);
int qzGetStatus(QzSession_T *sess, QzStatus_T *status);
unsigned int qzMaxCompressedLength(unsigned int src_sz, QzSession_T *sess);
"""

# Return codes (qatzip.h #defines).
QZ_OK = 0
QZ_DUPLICATE = 1
QZ_NO_HW = 11

ffi = cffi.FFI()
ffi.cdef(CDEF)

SPEC = LibrarySpec(
    label="libqatzip",
    env="MULTIFD_QATZIP_LIBRARY",
    find_name="qatzip",
    sonames=("libqatzip.so.3",),
    dependencies=("libusdm.so.0", "libqat.so.4"),
    symbols=("qzInit", "qzGetDefaultsDeflate", "qzSetupSessionDeflate", "qzCompress",
             "qzDecompress", "qzTeardownSession", "qzClose", "qzGetStatus"),
    install=("Install QATzip: apt-get install libqatzip3 (Debian 13+, Ubuntu 24.04+), or build "
             "intel/QATzip; in this repository scripts/setup-system.sh unpacks Debian 13's "
             "packages into .cache/qatzip/usr/lib/x86_64-linux-gnu/."),
)


def load() -> OpenLibrary:
    """The opened libqatzip, with its log level set to silent (raises LibraryNotFoundError)."""
    opened = open_library(SPEC, ffi)
    if not opened.ready:
        opened.lib.qzSetLogLevel(0)  # LOG_NONE: QATzip logs to stderr otherwise
        opened.ready = True
    return opened

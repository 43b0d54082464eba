/* multifd-pagecodec: one call per packet for QEMU's per-page DEFLATE container (qpl, uadk).
 * Plain declarations only: cffi reads this file as its cdef too (no include guard). */

#define PC_ZLIB 0
#define PC_ISAL 1

#define PC_OK 0
#define PC_BAD_LENGTH 1 /* a length is 0, over a page, or runs past the payload */
#define PC_SHORT_BLOB 2 /* a blob shorter than min_len */
#define PC_CORRUPT 3    /* the library refused the data (code, detail) */
#define PC_LENGTH 4     /* the stream ended, or overran, at got != page_size bytes */
#define PC_UNFINISHED 5 /* the blob ended before the stream did (got bytes so far) */
#define PC_NOMEM 6
#define PC_BAD_ARGS 7
#define PC_NO_BACKEND 8 /* built without this backend */

typedef struct {
    uint32_t page;    /* index of the failing page */
    int32_t status;   /* PC_* */
    uint32_t got;     /* bytes decoded (page_size + 1: more than a page) */
    int32_t code;     /* the library's return code (PC_CORRUPT) */
    char detail[128]; /* the library's message (PC_CORRUPT) */
} pc_failure;

/* Bit (1 << PC_ZLIB) | (1 << PC_ISAL) of the backends this build has. */
int pc_backends(void);
const char *pc_zlib_version(void);
/* ISA-L's version as major * 0x10000 + minor * 0x100 + patch; 0 without ISA-L. */
uint32_t pc_isal_version(void);

/* Compress n pages of page_size bytes (contiguous at pages) into out: the big-endian u32
 * length array, then each page's blob; a page whose DEFLATE stream is not smaller than a
 * page goes raw (length == page_size). Level 1; wbits as zlib's: -8..-15 raw DEFLATE with
 * that history (both backends), 9..15 a zlib stream (zlib only). out must hold
 * 4 * n + n * page_size bytes. Returns the payload length, or -PC_* on failure. */
int64_t pc_compress(int backend, int wbits, const uint8_t *pages, uint32_t n,
                    uint32_t page_size, uint8_t *out, uint64_t out_size);

/* Decode a payload of n pages into out (n * page_size bytes): raw pages are copied, the
 * others inflated as raw DEFLATE (32 KiB window) after skipping `skip` bytes, each to exactly
 * one page and the end of its stream (bytes after the end are ignored). Never writes past a
 * page's slot. Returns PC_OK, or the status also stored in *failure. */
int pc_decompress(int backend, uint32_t skip, uint32_t min_len, const uint8_t *payload,
                  uint64_t payload_size, uint32_t n, uint32_t page_size, uint8_t *out,
                  pc_failure *failure);

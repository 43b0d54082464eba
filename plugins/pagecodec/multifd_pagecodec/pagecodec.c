/* multifd-pagecodec: the per-page loop of QEMU's qpl/uadk container, one C call a packet.
 *
 * Compression mirrors what Python's zlib.compress(page, 1, wbits) and the isal package's
 * isal_zlib.compress(page, 1, wbits) do per page (same parameters, same library calls), so
 * with the same library build the bytes are the same. Decompression mirrors
 * decompressobj(-15).decompress(blob, page_size + 1) followed by the checks of the plugins'
 * Python decoders. Python calls these through cffi, which releases the GIL around them.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef PAGECODEC_HAVE_ISAL
#include <isa-l/igzip_lib.h>
#if defined(__has_include)
#if __has_include(<isa-l.h>)
#include <isa-l.h> /* ISAL_VERSION (ISA-L >= 2.30) */
#endif
#endif
#endif
#ifndef ISAL_VERSION
#define ISAL_VERSION 0
#endif

#include "pagecodec.h"

#define LEVEL 1
#define MEM_LEVEL 8 /* zlib's DEF_MEM_LEVEL, as Python's zlib.compress */
#define MAX_PAGE (1u << 24)

int pc_backends(void)
{
#ifdef PAGECODEC_HAVE_ISAL
    return (1 << PC_ZLIB) | (1 << PC_ISAL);
#else
    return 1 << PC_ZLIB;
#endif
}

const char *pc_zlib_version(void) { return zlibVersion(); }

uint32_t pc_isal_version(void)
{
#ifdef PAGECODEC_HAVE_ISAL
    return ISAL_VERSION;
#else
    return 0;
#endif
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* ------------------------------------------------------------------ library state */

/* One direction's library state for a packet, reset page by page. */
typedef struct {
    int backend;
    int inflating;
    int z_open;
    z_stream z;
#ifdef PAGECODEC_HAVE_ISAL
    int hist_bits;
    struct isal_zstream *zs;
    uint8_t *level_buf;
    struct inflate_state *is;
#endif
} codec;

/* wbits as zlib's for compression; inflating is always raw with a 32 KiB window. All state
 * is zeroed: with malloc'd buffers ISA-L's output varied from run to run (about 1 packet in
 * 20, always valid DEFLATE), which broke byte-identity with the Python path. */
static int codec_open(codec *c, int backend, int wbits, int inflating)
{
    memset(c, 0, sizeof(*c));
    c->backend = backend;
    c->inflating = inflating;
    if (backend != PC_ZLIB && backend != PC_ISAL)
        return PC_BAD_ARGS;
    if (backend == PC_ZLIB) {
        int rc = inflating ? inflateInit2(&c->z, -15)
                           : deflateInit2(&c->z, LEVEL, Z_DEFLATED, wbits, MEM_LEVEL,
                                          Z_DEFAULT_STRATEGY);
        if (rc != Z_OK)
            return rc == Z_STREAM_ERROR ? PC_BAD_ARGS : PC_NOMEM;
        c->z_open = 1;
        return PC_OK;
    }
#ifdef PAGECODEC_HAVE_ISAL
    if (inflating) {
        c->is = calloc(1, sizeof(*c->is));
        return c->is ? PC_OK : PC_NOMEM;
    }
    if (wbits > -8 || wbits < -15) /* raw DEFLATE only */
        return PC_BAD_ARGS;
    c->hist_bits = -wbits;
    c->zs = calloc(1, sizeof(*c->zs));
    c->level_buf = calloc(1, ISAL_DEF_LVL1_DEFAULT);
    return c->zs && c->level_buf ? PC_OK : PC_NOMEM;
#else
    return PC_NO_BACKEND;
#endif
}

static void codec_close(codec *c)
{
    if (c->z_open)
        (void)(c->inflating ? inflateEnd(&c->z) : deflateEnd(&c->z));
#ifdef PAGECODEC_HAVE_ISAL
    free(c->zs);
    free(c->level_buf);
    free(c->is);
#endif
}

/* ------------------------------------------------------------------ compression */

/* Compress src (size bytes) into dst (cap bytes): the stream's length, or -1 when it did
 * not complete in cap bytes. */
static int64_t encode_page(codec *e, const uint8_t *src, uint32_t size, uint8_t *dst,
                           uint32_t cap)
{
    if (e->backend == PC_ZLIB) {
        z_stream *z = &e->z;
        if (deflateReset(z) != Z_OK)
            return -1;
        z->next_in = (Bytef *)src;
        z->avail_in = size;
        z->next_out = dst;
        z->avail_out = cap;
        return deflate(z, Z_FINISH) == Z_STREAM_END ? (int64_t)z->total_out : -1;
    }
#ifdef PAGECODEC_HAVE_ISAL
    struct isal_zstream *s = e->zs;
    isal_deflate_init(s); /* as the isal package: a fresh stream a call */
    s->level = LEVEL;
    s->level_buf = e->level_buf;
    s->level_buf_size = ISAL_DEF_LVL1_DEFAULT;
    s->hist_bits = (uint16_t)e->hist_bits;
    s->gzip_flag = IGZIP_DEFLATE;
    s->next_in = (uint8_t *)src;
    s->avail_in = size;
    s->flush = FULL_FLUSH;
    s->end_of_stream = 1;
    s->next_out = dst;
    s->avail_out = cap;
    if (isal_deflate(s) != COMP_OK || s->internal_state.state != ZSTATE_END)
        return -1;
    return (int64_t)s->total_out;
#else
    return -1;
#endif
}

int64_t pc_compress(int backend, int wbits, const uint8_t *pages, uint32_t n,
                    uint32_t page_size, uint8_t *out, uint64_t out_size)
{
    uint64_t pos = 4ull * n;
    if (page_size == 0 || page_size > MAX_PAGE || out_size < pos + (uint64_t)n * page_size)
        return -PC_BAD_ARGS;
    /* Room for any page's whole stream (stored blocks grow it a little) and at least the
     * 16 KiB the isal package starts with: the finished stream decides raw or not, as in
     * Python, and a stream is never cut short. */
    uint32_t cap = 2 * page_size + 1024 < 16384 ? 16384 : 2 * page_size + 1024;
    uint8_t *scratch = calloc(1, cap); /* zeroed, as the codec state (codec_open) */
    if (scratch == NULL)
        return -PC_NOMEM;
    codec e;
    int rc = codec_open(&e, backend, wbits, 0);
    if (rc != PC_OK) {
        codec_close(&e);
        free(scratch);
        return -rc;
    }
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *page = pages + (uint64_t)i * page_size;
        int64_t len = encode_page(&e, page, page_size, scratch, cap);
        if (len >= 0 && len < page_size) {
            memcpy(out + pos, scratch, (size_t)len);
        } else { /* does not shrink: the raw page */
            memcpy(out + pos, page, page_size);
            len = page_size;
        }
        put_be32(out + 4ull * i, (uint32_t)len);
        pos += (uint64_t)len;
    }
    codec_close(&e);
    free(scratch);
    return (int64_t)pos;
}

/* ------------------------------------------------------------------ decompression */

typedef enum { STEP_ERROR, STEP_END, STEP_MORE } step;

static int decoder_start(codec *d, const uint8_t *blob, uint32_t len)
{
    if (d->backend == PC_ZLIB) {
        if (inflateReset(&d->z) != Z_OK)
            return -1;
        d->z.next_in = (Bytef *)blob;
        d->z.avail_in = len;
        return 0;
    }
#ifdef PAGECODEC_HAVE_ISAL
    isal_inflate_init(d->is);
    d->is->crc_flag = ISAL_DEFLATE;
    d->is->hist_bits = 15;
    d->is->next_in = (uint8_t *)blob;
    d->is->avail_in = len;
#endif
    return 0;
}

#ifdef PAGECODEC_HAVE_ISAL
static const char *isal_message(int rc)
{
    switch (rc) {
    case ISAL_INVALID_BLOCK: return "Invalid deflate block found";
    case ISAL_INVALID_SYMBOL: return "Invalid deflate symbol found";
    case ISAL_INVALID_LOOKBACK: return "Invalid lookback distance found";
    default: return "Unknown error";
    }
}
#endif

/* Inflate into dst[0:room]; *made gets the bytes written. */
static step decoder_step(codec *d, uint8_t *dst, uint32_t room, uint32_t *made,
                         pc_failure *f)
{
    if (d->backend == PC_ZLIB) {
        z_stream *z = &d->z;
        z->next_out = dst;
        z->avail_out = room;
        int rc = inflate(z, Z_SYNC_FLUSH);
        *made = room - z->avail_out;
        if (rc == Z_STREAM_END)
            return STEP_END;
        if (rc == Z_OK || rc == Z_BUF_ERROR)
            return STEP_MORE;
        f->code = rc;
        snprintf(f->detail, sizeof(f->detail), "Error %d while decompressing data: %s", rc,
                 z->msg ? z->msg : "invalid input data");
        return STEP_ERROR;
    }
#ifdef PAGECODEC_HAVE_ISAL
    struct inflate_state *s = d->is;
    s->next_out = dst;
    s->avail_out = room;
    int rc = isal_inflate(s);
    *made = room - s->avail_out;
    if (rc < 0) {
        f->code = rc;
        snprintf(f->detail, sizeof(f->detail), "Error %d %s", rc, isal_message(rc));
        return STEP_ERROR;
    }
    return s->block_state == ISAL_BLOCK_FINISH ? STEP_END : STEP_MORE;
#else
    (void)dst, (void)room, (void)made, (void)f;
    return STEP_ERROR;
#endif
}

/* Inflate one blob to exactly page_size bytes at dst; a spare byte tells a stream that is
 * one page long from one that is longer (what max_length = page_size + 1 does in Python). */
static int decode_page(codec *d, const uint8_t *blob, uint32_t len, uint8_t *dst,
                       uint32_t page_size, pc_failure *f)
{
    uint8_t spare;
    uint32_t made = 0, extra = 0;
    if (decoder_start(d, blob, len) != 0)
        return PC_NOMEM;
    step st = decoder_step(d, dst, page_size, &made, f);
    if (st == STEP_MORE && made == page_size)
        st = decoder_step(d, &spare, 1, &extra, f);
    f->got = made + extra;
    if (st == STEP_ERROR)
        return PC_CORRUPT;
    if (st == STEP_MORE && f->got <= page_size)
        return PC_UNFINISHED;
    return f->got == page_size ? PC_OK : PC_LENGTH;
}

int pc_decompress(int backend, uint32_t skip, uint32_t min_len, const uint8_t *payload,
                  uint64_t payload_size, uint32_t n, uint32_t page_size, uint8_t *out,
                  pc_failure *failure)
{
    memset(failure, 0, sizeof(*failure));
    uint64_t pos = 4ull * n;
    if (page_size == 0 || page_size > MAX_PAGE || pos > payload_size || skip >= page_size)
        return failure->status = PC_BAD_ARGS;
    codec d;
    int rc = codec_open(&d, backend, -15, 1);
    for (uint32_t i = 0; i < n && rc == PC_OK; i++) {
        uint32_t len = get_be32(payload + 4ull * i);
        uint8_t *dst = out + (uint64_t)i * page_size;
        failure->page = i;
        if (len == 0 || len > page_size || len > payload_size - pos) {
            failure->got = len;
            rc = PC_BAD_LENGTH;
        } else if (len == page_size) {
            memcpy(dst, payload + pos, page_size);
        } else if (len < min_len || len <= skip) {
            failure->got = len;
            rc = PC_SHORT_BLOB;
        } else {
            rc = decode_page(&d, payload + pos + skip, len - skip, dst, page_size, failure);
        }
        pos += len;
    }
    codec_close(&d);
    return failure->status = rc;
}

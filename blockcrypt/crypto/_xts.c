/*
 * AES-256-XTS over a run of whole sectors, for blockcrypt.crypto.fast.
 *
 * Rules of this file:
 *
 *  - The caller (fast.py) has checked every argument: buffer lengths, the
 *    sector size, and that the last tweak fits in 128 bits. Nothing here
 *    validates again, and nothing here touches Python objects, so the
 *    calls run with the GIL released.
 *  - A handle owns two EVP contexts, one per direction, each given the key
 *    once when the handle is made. AES needs a different key schedule to
 *    decrypt, so one context cannot serve both directions without being
 *    keyed again. Per sector only the IV (the XTS tweak) is set again.
 *  - The tweak of sector i of a run is tweak + i * step, a 128-bit
 *    little-endian number (dm-crypt plain64, IEEE 1619 section 5.1).
 *  - A handle is used by one thread at a time; fast.py keeps a pool.
 *  - Every OpenSSL failure clears the thread's error queue and returns -1.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

struct bc_xts {
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
};

#define BC_XTS_KEY_BYTES 64
#define BC_XTS_IV_BYTES 16

void bc_xts_free(struct bc_xts *h)
{
    if (h == NULL)
        return;
    /* EVP_CIPHER_CTX_free wipes the key schedule it holds. */
    EVP_CIPHER_CTX_free(h->enc);
    EVP_CIPHER_CTX_free(h->dec);
    OPENSSL_cleanse(h, sizeof(*h));
    OPENSSL_free(h);
}

struct bc_xts *bc_xts_new(const unsigned char *key)
{
    struct bc_xts *h = OPENSSL_zalloc(sizeof(*h));

    if (h == NULL)
        goto fail;
    h->enc = EVP_CIPHER_CTX_new();
    h->dec = EVP_CIPHER_CTX_new();
    if (h->enc == NULL || h->dec == NULL)
        goto fail;
    /* The caller passes exactly BC_XTS_KEY_BYTES; make sure EVP agrees. */
    if (EVP_CIPHER_key_length(EVP_aes_256_xts()) != BC_XTS_KEY_BYTES)
        goto fail;
    if (!EVP_CipherInit_ex(h->enc, EVP_aes_256_xts(), NULL, key, NULL, 1))
        goto fail;
    if (!EVP_CipherInit_ex(h->dec, EVP_aes_256_xts(), NULL, key, NULL, 0))
        goto fail;
    return h;

fail:
    bc_xts_free(h);
    ERR_clear_error();
    return NULL;
}

/* A second handle with the same key, for another thread. */
struct bc_xts *bc_xts_dup(const struct bc_xts *src)
{
    struct bc_xts *h = OPENSSL_zalloc(sizeof(*h));

    if (h == NULL)
        goto fail;
    h->enc = EVP_CIPHER_CTX_new();
    h->dec = EVP_CIPHER_CTX_new();
    if (h->enc == NULL || h->dec == NULL)
        goto fail;
    if (!EVP_CIPHER_CTX_copy(h->enc, src->enc)
        || !EVP_CIPHER_CTX_copy(h->dec, src->dec))
        goto fail;
    return h;

fail:
    bc_xts_free(h);
    ERR_clear_error();
    return NULL;
}

static int is_all_zero(const unsigned char *p, size_t n)
{
    uint64_t acc = 0, word;
    size_t i;

    /* n is a multiple of 512. Test 64 bytes at a time, leave at the first
     * non-zero block: ciphertext almost never starts with 64 zero bytes. */
    for (i = 0; i < n; i += 64) {
        for (size_t j = 0; j < 64; j += 8) {
            memcpy(&word, p + i + j, 8);
            acc |= word;
        }
        if (acc != 0)
            return 0;
    }
    return 1;
}

static void store_le128(unsigned char iv[BC_XTS_IV_BYTES], uint64_t lo,
                        uint64_t hi)
{
    for (int i = 0; i < 8; i++) {
        iv[i] = (unsigned char)(lo >> (8 * i));
        iv[8 + i] = (unsigned char)(hi >> (8 * i));
    }
}

/*
 * Encrypt (encrypt != 0) or decrypt `sectors` sectors of `sector_size`
 * bytes from src to dst. dst may equal src; the two must not otherwise
 * overlap. With zero_is_hole set (decrypt only), an all-zero source sector
 * gives an all-zero sector instead of being decrypted. Returns 0, or -1 if
 * OpenSSL failed (dst is then partly written).
 */
int bc_xts_run(struct bc_xts *h, int encrypt, const unsigned char *src,
               unsigned char *dst, size_t sectors, size_t sector_size,
               uint64_t tweak_lo, uint64_t tweak_hi, uint64_t step,
               int zero_is_hole)
{
    EVP_CIPHER_CTX *ctx = encrypt ? h->enc : h->dec;
    int enc = encrypt ? 1 : 0;
    unsigned char iv[BC_XTS_IV_BYTES];
    int outl;

    for (size_t i = 0; i < sectors; i++) {
        const unsigned char *in = src + i * sector_size;
        unsigned char *out = dst + i * sector_size;

        if (zero_is_hole && is_all_zero(in, sector_size)) {
            if (out != in)
                memset(out, 0, sector_size);
        } else {
            store_le128(iv, tweak_lo, tweak_hi);
            if (!EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc)
                || !EVP_CipherUpdate(ctx, out, &outl, in, (int)sector_size)
                || (size_t)outl != sector_size) {
                ERR_clear_error();
                return -1;
            }
        }

        /* Next tweak: add step with a carry into the high half. */
        tweak_lo += step;
        if (tweak_lo < step)
            tweak_hi++;
    }
    return 0;
}

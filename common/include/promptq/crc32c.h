/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), software slicing-by-8.
 * Used to frame spool records; the same checksum as iSCSI, ext4 metadata and Kafka's record
 * batches. Check value: pq_crc32c(0, "123456789", 9) == 0xE3069283. */
#ifndef PROMPTQ_CRC32C_H
#define PROMPTQ_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues a CRC32C over buf: start with crc = 0, then pass the previous result to checksum a
 * buffer in pieces (pq_crc32c(pq_crc32c(0, a, n), b, m) == CRC of a||b). buf: borrowed, may be
 * NULL when len is 0. Pure and thread-safe. */
uint32_t pq_crc32c(uint32_t crc, const void *buf, size_t len);

#endif

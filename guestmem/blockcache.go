package guestmem

import (
	"errors"
	"sync"
)

// BlockCache is a Memory that reads the memory below it in aligned blocks
// and keeps them, for the duration of one scan. Kernel objects of one kind
// sit together in slab pages (task_structs in order-3 slabs, creds many to a
// page), so a walk over thousands of tasks touches far fewer blocks than it
// makes reads, and each read of live memory is a system call. Make a new
// cache for every scan: a cached block is as old as the scan.
type BlockCache struct {
	mem       Memory
	blockSize uint64
	maxBlocks int

	mu     sync.Mutex
	blocks map[uint64][]byte // by block-aligned GPA; nil value: not cacheable
	reads  int               // reads of the memory below
}

// NewBlockCache caches mem in blocks of blockSize bytes (a power of two),
// holding at most maxBytes.
func NewBlockCache(mem Memory, blockSize, maxBytes int) *BlockCache {
	if blockSize < 4096 || blockSize&(blockSize-1) != 0 {
		blockSize = 64 << 10
	}
	return &BlockCache{mem: mem, blockSize: uint64(blockSize), maxBlocks: max(1, maxBytes/blockSize), blocks: map[uint64][]byte{}}
}

// Regions are those of the memory below.
func (c *BlockCache) Regions() []Region { return c.mem.Regions() }

// Reads is how many reads reached the memory below.
func (c *BlockCache) Reads() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reads
}

// ReadAt reads through the cache. A block that cannot be read whole (it
// straddles the end of guest RAM) is not cached; such reads go straight
// to the memory below.
func (c *BlockCache) ReadAt(p []byte, gpa int64) (int, error) {
	if gpa < 0 {
		return c.mem.ReadAt(p, gpa)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	done := 0
	for done < len(p) {
		addr := uint64(gpa) + uint64(done)
		base := addr &^ (c.blockSize - 1)
		b, err := c.block(base)
		if err != nil {
			return done, err
		}
		if b == nil {
			c.reads++
			n, err := c.mem.ReadAt(p[done:], int64(addr))
			return done + n, err
		}
		done += copy(p[done:], b[addr-base:])
	}
	return done, nil
}

// block returns the cached block at base, reading it if needed; nil when
// it cannot be read whole. Precondition: c.mu held.
func (c *BlockCache) block(base uint64) ([]byte, error) {
	if b, ok := c.blocks[base]; ok {
		return b, nil
	}
	if len(c.blocks) >= c.maxBlocks {
		clear(c.blocks)
	}
	b := make([]byte, c.blockSize)
	c.reads++
	if _, err := c.mem.ReadAt(b, int64(base)); err != nil {
		var hole *HoleError
		if errors.As(err, &hole) {
			c.blocks[base] = nil
			return nil, nil
		}
		return nil, err
	}
	c.blocks[base] = b
	return b, nil
}

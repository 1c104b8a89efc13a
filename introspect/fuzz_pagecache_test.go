package introspect

import (
	"encoding/binary"
	"testing"
)

// The forged dentries, inodes and xarray of FuzzCachedFile: the layout,
// and where each object is in the forged image (fuzzKernel's memory).
var fuzzFileLayout = fileLayout{
	taskFS: 0x10, fsRootDentry: 0x08,
	dNameLen: 0x04, dNameName: 0x08, dInode: 0x10, dParent: 0x18, dSubdirs: 0x20, dChild: 0x30,
	iMode: 0, iSize: 0x08, iMapping: 0x10, iIno: 0x18, xaHead: 0x08,
	nodeShift: 0, nodeSlots: 0x10, pageSize: 64, pageIx: 0x08,
}

const fuzzVmemmap = fuzzBase + 0x800

// forgedFiles is a root with /etc/passwd (10 bytes in page frame 2,
// found through an xarray node) and the directory /etc.
func forgedFiles() []byte {
	mem := make([]byte, 0x3000)
	va := func(off int) uint64 { return fuzzBase + uint64(off) }
	put := func(off int, v uint64) { binary.LittleEndian.PutUint64(mem[off:], v) }
	put(0x010, va(0x100)) // task->fs
	put(0x108, va(0x200)) // fs->root.dentry
	put(0x220, va(0x330)) // root's children: etc
	put(0x218, va(0x200)) // root's parent: itself
	binary.LittleEndian.PutUint32(mem[0x304:], 3)
	put(0x308, va(0x380)) // "etc"
	copy(mem[0x380:], "etc")
	put(0x310, va(0x700)) // etc's inode: a directory
	put(0x318, va(0x200)) // etc's parent
	put(0x330, va(0x220)) // etc's sibling: back to the root's head
	put(0x320, va(0x430)) // etc's children: passwd
	binary.LittleEndian.PutUint32(mem[0x404:], 6)
	put(0x408, va(0x480))
	copy(mem[0x480:], "passwd")
	put(0x410, va(0x600))
	put(0x418, va(0x300))
	put(0x430, va(0x320)) // passwd's sibling: back to etc's head
	binary.LittleEndian.PutUint16(mem[0x600:], 0o100644)
	put(0x608, 10)               // i_size
	put(0x610, va(0x680))        // i_mapping
	put(0x618, 7)                // i_ino
	put(0x688, va(0x900)|2)      // xa_head: a node
	put(0x910, fuzzVmemmap+2*64) // node slot 0: struct page of frame 2
	binary.LittleEndian.PutUint16(mem[0x700:], 0o40755)
	copy(mem[0x2000:], "kvmscope\n\n")
	return mem
}

func fuzzFileKernel(mem []byte) *Kernel {
	k := fuzzKernel(mem)
	k.VmemmapBase = fuzzVmemmap
	return k
}

func TestForgedCachedFile(t *testing.T) {
	k := fuzzFileKernel(forgedFiles())
	f, err := k.readCachedFile(&fuzzFileLayout, fuzzBase, "/etc/./passwd", 4096)
	if err != nil || string(f.Data) != "kvmscope\n\n" || f.Inode != 7 || f.Uncached != nil {
		t.Fatalf("%+v %v", f, err)
	}
	if _, err := k.readCachedFile(&fuzzFileLayout, fuzzBase, "/etc", 4096); err == nil {
		t.Error("/etc read as a file")
	}
	if _, err := k.readCachedFile(&fuzzFileLayout, fuzzBase, "/etc/shadow", 4096); err == nil {
		t.Error("/etc/shadow found")
	}
}

// FuzzCachedFile: the path walk and the xarray lookup on hostile memory
// and paths never panic and never return more than asked.
func FuzzCachedFile(f *testing.F) {
	f.Add(forgedFiles(), "/etc/passwd")
	f.Add(forgedFiles(), "/../etc/../etc/passwd")
	f.Fuzz(func(t *testing.T, mem []byte, path string) {
		if len(mem) > fuzzMax {
			return
		}
		k := fuzzFileKernel(mem)
		file, err := k.readCachedFile(&fuzzFileLayout, fuzzBase, path, 8192)
		if err == nil && len(file.Data) > 8192 {
			t.Fatalf("%d bytes", len(file.Data))
		}
	})
}

package introspect

import (
	"errors"
	"fmt"
	"strings"
)

// CachedFile is the start of a guest file as the guest kernel's page
// cache holds it, read without the guest's help: the path walked through
// the dentry cache from init's root, the inode's pages found in its
// mapping's xarray.
type CachedFile struct {
	Path  string `json:"path"`
	Inode uint64 `json:"inode"`
	Size  int64  `json:"size"` // i_size
	// Data is the file's first bytes, up to the first page the page
	// cache does not hold (Uncached then names that page's index).
	Data     []byte `json:"data"`
	Uncached *int64 `json:"uncached_page,omitempty"`
}

// fileLayout is where the members the walk reads are (BTF).
type fileLayout struct {
	taskFS, fsRootDentry                   int64
	dNameLen, dNameName, dInode, dParent   int64
	dSubdirs, dChild                       int64 // list_head (up to 6.7)
	hlist                                  bool  // d_children/d_sib hlist (6.8 on)
	iMode, iSize, iMapping, iIno, xaHead   int64 // xaHead: in address_space
	nodeShift, nodeSlots, pageSize, pageIx int64
}

// Bounds of the walk: names are at most NAME_MAX, paths PATH_MAX.
const (
	maxPathLen     = 4096
	maxNameLen     = 255
	maxComponents  = 256
	maxChildren    = 1 << 17 // dentries scanned in one walk, all directories
	maxFileRead    = 1 << 20
	xaChunkShift   = 6 // XA_CHUNK_SHIFT (CONFIG_BASE_SMALL=0)
	maxXarrayDepth = 11
)

// ErrNotCached is a path or page the guest kernel's caches do not hold
// (the file may still be on disk).
var ErrNotCached = errors.New("not in the guest kernel's caches")

func (k *Kernel) fileLayout() (*fileLayout, error) {
	if k.BTF == nil {
		return nil, errors.New("the guest kernel has no BTF: kvmscope does not know the dentry, inode and xarray layouts")
	}
	var l fileLayout
	var errs []error
	off := func(dst *int64, st, m string) {
		v, err := k.MemberOffset(st, m)
		if err != nil {
			errs = append(errs, err)
		}
		*dst = int64(v)
	}
	off(&l.taskFS, "task_struct", "fs")
	off(&l.fsRootDentry, "fs_struct", "root.dentry")
	off(&l.dNameLen, "dentry", "d_name.len")
	off(&l.dNameName, "dentry", "d_name.name")
	off(&l.dInode, "dentry", "d_inode")
	off(&l.dParent, "dentry", "d_parent")
	if _, err := k.MemberOffset("dentry", "d_subdirs"); err == nil {
		off(&l.dSubdirs, "dentry", "d_subdirs")
		off(&l.dChild, "dentry", "d_child")
	} else {
		// Linux 6.8 made the children an hlist (d_children, d_sib).
		l.hlist = true
		off(&l.dSubdirs, "dentry", "d_children")
		off(&l.dChild, "dentry", "d_sib")
	}
	off(&l.iMode, "inode", "i_mode")
	off(&l.iSize, "inode", "i_size")
	off(&l.iMapping, "inode", "i_mapping")
	off(&l.iIno, "inode", "i_ino")
	off(&l.xaHead, "address_space", "i_pages.xa_head")
	off(&l.nodeShift, "xa_node", "shift")
	off(&l.nodeSlots, "xa_node", "slots")
	off(&l.pageIx, "page", "index")
	sz, err := k.TypeSize("page")
	if err != nil {
		errs = append(errs, err)
	}
	l.pageSize = int64(sz)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if l.pageSize < 32 || l.pageSize > 256 {
		return nil, fmt.Errorf("BTF: struct page of %d bytes", l.pageSize)
	}
	return &l, nil
}

// ReadCachedFile reads up to n bytes of the file at path, from the root
// of the task at task (init's: the file system the guest runs on, after
// any switch_root), through the guest kernel's dentry cache and page
// cache only. Mount points are not crossed: the walk stays in the root's
// file system.
func (k *Kernel) ReadCachedFile(task uint64, path string, n int) (*CachedFile, error) {
	l, err := k.fileLayout()
	if err != nil {
		return nil, err
	}
	return k.readCachedFile(l, task, path, n)
}

func (k *Kernel) readCachedFile(l *fileLayout, task uint64, path string, n int) (*CachedFile, error) {
	if len(path) == 0 || path[0] != '/' || len(path) > maxPathLen {
		return nil, fmt.Errorf("path %.80q: want an absolute path of at most %d bytes", path, maxPathLen)
	}
	if n <= 0 || n > maxFileRead {
		return nil, fmt.Errorf("want 1 to %d bytes, not %d", maxFileRead, n)
	}
	fs, err := k.ReadPtr(task + uint64(l.taskFS))
	if err != nil || fs == 0 {
		return nil, fmt.Errorf("the task's fs_struct: %v", orNull(err))
	}
	d, err := k.ReadPtr(fs + uint64(l.fsRootDentry))
	if err != nil || d == 0 {
		return nil, fmt.Errorf("the root dentry: %v", orNull(err))
	}
	parts := strings.Split(path[1:], "/")
	if len(parts) > maxComponents {
		return nil, fmt.Errorf("path %.80q: more than %d components", path, maxComponents)
	}
	budget := maxChildren
	for i, name := range parts {
		switch {
		case name == "" || name == ".":
			continue
		case name == "..":
			if d, err = k.ReadPtr(d + uint64(l.dParent)); err != nil {
				return nil, err
			}
			continue
		case len(name) > maxNameLen:
			return nil, fmt.Errorf("%.80q: a name longer than %d bytes", name, maxNameLen)
		}
		if d, err = k.child(l, d, name, &budget); err != nil {
			return nil, fmt.Errorf("%s: %w", "/"+strings.Join(parts[:i+1], "/"), err)
		}
	}
	inode, err := k.ReadPtr(d + uint64(l.dInode))
	if err != nil || inode == 0 {
		return nil, fmt.Errorf("%s: the inode: %v", path, orNull(err))
	}
	var ib [8]byte
	if err := k.ReadVirt(ib[:2], inode+uint64(l.iMode)); err != nil {
		return nil, err
	}
	if mode := uint16(ib[0]) | uint16(ib[1])<<8; mode&0xf000 != 0x8000 {
		return nil, fmt.Errorf("%s is not a regular file (mode %#o)", path, mode)
	}
	size, err := k.ReadU64(inode + uint64(l.iSize))
	if err != nil {
		return nil, err
	}
	ino, _ := k.ReadU64(inode + uint64(l.iIno))
	mapping, err := k.ReadPtr(inode + uint64(l.iMapping))
	if err != nil || mapping == 0 {
		return nil, fmt.Errorf("%s: the inode's mapping: %v", path, orNull(err))
	}
	f := &CachedFile{Path: path, Inode: ino, Size: int64(size)}
	want := min(uint64(n), size)
	f.Data = make([]byte, 0, want)
	for idx := int64(0); uint64(len(f.Data)) < want; idx++ {
		pa, err := k.cachedPage(l, mapping, idx)
		if errors.Is(err, ErrNotCached) {
			f.Uncached = &idx
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: page %d: %w", path, idx, err)
		}
		chunk := make([]byte, min(4096, want-uint64(len(f.Data))))
		if _, err := k.Mem.ReadAt(chunk, int64(pa)); err != nil {
			return nil, fmt.Errorf("%s: page %d at %#x: %w", path, idx, pa, err)
		}
		f.Data = append(f.Data, chunk...)
	}
	return f, nil
}

func orNull(err error) error {
	if err == nil {
		return errors.New("NULL")
	}
	return err
}

// child finds the positive dentry name among d's children in the dentry
// cache (d_subdirs through each child's d_child; from 6.8 the hlist
// d_children through d_sib).
func (k *Kernel) child(l *fileLayout, d uint64, name string, budget *int) (uint64, error) {
	head := d + uint64(l.dSubdirs)
	node, err := k.ReadPtr(head)
	if err != nil {
		return 0, err
	}
	var buf [maxNameLen]byte
	for node != 0 && (l.hlist || node != head) {
		if *budget--; *budget < 0 {
			return 0, fmt.Errorf("more than %d dentries on the way (a cycle?)", maxChildren)
		}
		c := node - uint64(l.dChild)
		if node, err = k.ReadPtr(node); err != nil {
			return 0, err
		}
		n, err := k.ReadU32(c + uint64(l.dNameLen))
		if err != nil || int(n) != len(name) {
			continue
		}
		np, err := k.ReadPtr(c + uint64(l.dNameName))
		if err != nil || k.ReadVirt(buf[:n], np) != nil || string(buf[:n]) != name {
			continue
		}
		if inode, err := k.ReadPtr(c + uint64(l.dInode)); err != nil || inode == 0 {
			continue // a negative dentry: the guest found no such file
		}
		return c, nil
	}
	return 0, fmt.Errorf("%w (no dentry for %q)", ErrNotCached, name)
}

// cachedPage is the guest-physical address of page idx of the mapping,
// from its xarray (include/linux/xarray.h): an entry whose low two bits
// are 2 is internal, a node when above 4096 (the pointer is entry-2), a
// sibling of a multi-index entry when below 256 (its slot holds the
// entry); an entry with bit 0 set is a value (the shadow of an evicted
// page). A leaf is a folio: the struct page of its first page, whose
// index is the folio's.
func (k *Kernel) cachedPage(l *fileLayout, mapping uint64, idx int64) (uint64, error) {
	entry, err := k.ReadPtr(mapping + uint64(l.xaHead))
	if err != nil {
		return 0, err
	}
	isNode := func(e uint64) bool { return e&3 == 2 && e > 4096 }
	if !isNode(entry) && idx != 0 {
		return 0, ErrNotCached
	}
	for depth := 0; isNode(entry); depth++ {
		if depth > maxXarrayDepth {
			return 0, errors.New("xarray deeper than 11 levels")
		}
		node := entry - 2
		var sb [1]byte
		if err := k.ReadVirt(sb[:], node+uint64(l.nodeShift)); err != nil {
			return 0, err
		}
		shift := int(sb[0])
		if shift%xaChunkShift != 0 || shift > 60 {
			return 0, fmt.Errorf("xa_node shift %d", shift)
		}
		if depth == 0 && shift+xaChunkShift < 63 && idx>>(shift+xaChunkShift) != 0 {
			return 0, ErrNotCached // beyond what the tree covers
		}
		slot := (idx >> shift) & (1<<xaChunkShift - 1)
		slots := node + uint64(l.nodeSlots)
		if entry, err = k.ReadPtr(slots + 8*uint64(slot)); err != nil {
			return 0, err
		}
		if entry&3 == 2 && entry < 256 {
			// A sibling: the multi-index entry is at the slot it names.
			if entry, err = k.ReadPtr(slots + 8*((entry>>2)&(1<<xaChunkShift-1))); err != nil {
				return 0, err
			}
		}
	}
	if entry == 0 || entry&3 != 0 {
		return 0, ErrNotCached // empty, a value (shadow) or another internal entry
	}
	// The page of idx in the folio entry.
	first, err := k.ReadU64(entry + uint64(l.pageIx))
	if err != nil {
		return 0, err
	}
	delta := idx - int64(first)
	if delta < 0 || delta >= 1<<18 {
		return 0, fmt.Errorf("a folio of index %d holds page %d", int64(first), idx)
	}
	page := entry + uint64(delta)*uint64(l.pageSize)
	if page < k.VmemmapBase || (page-k.VmemmapBase)%uint64(l.pageSize) != 0 {
		return 0, fmt.Errorf("struct page %#x is not in the vmemmap at %#x", page, k.VmemmapBase)
	}
	pfn := (page - k.VmemmapBase) / uint64(l.pageSize)
	if k.ramEnd != 0 && pfn<<12 >= k.ramEnd {
		return 0, fmt.Errorf("page frame %#x is beyond guest RAM", pfn)
	}
	return pfn << 12, nil
}

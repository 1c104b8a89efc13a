package introspect

import (
	"bytes"
	"errors"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// testBTF builds a small raw BTF blob shaped like the kernel's types:
// a struct with a nested struct, an anonymous union and a pointer.
func testBTF(t testing.TB) []byte {
	t.Helper()
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	u64 := &btf.Int{Name: "long unsigned int", Size: 8}
	listHead := &btf.Struct{Name: "list_head", Size: 16}
	listHead.Members = []btf.Member{
		{Name: "next", Type: &btf.Pointer{Target: listHead}, Offset: 0},
		{Name: "prev", Type: &btf.Pointer{Target: listHead}, Offset: 64},
	}
	kuid := &btf.Typedef{Name: "kuid_t", Type: &btf.Struct{Name: "", Size: 4, Members: []btf.Member{{Name: "val", Type: u32}}}}
	cred := &btf.Struct{Name: "cred", Size: 16, Members: []btf.Member{
		{Name: "usage", Type: u32, Offset: 0},
		{Name: "uid", Type: kuid, Offset: 32},
		{Name: "gid", Type: kuid, Offset: 64},
	}}
	anon := &btf.Union{Size: 8, Members: []btf.Member{
		{Name: "rcu_users", Type: u64},
		{Name: "rcu_head", Type: u64},
	}}
	task := &btf.Struct{Name: "task_struct", Size: 64, Members: []btf.Member{
		{Name: "state", Type: u32, Offset: 0},
		{Name: "flags", Type: u32, Offset: 32, BitfieldSize: 0},
		{Name: "tasks", Type: listHead, Offset: 64},
		{Name: "", Type: anon, Offset: 192},
		{Name: "cred", Type: &btf.Pointer{Target: cred}, Offset: 256},
		{Name: "in_execve", Type: u32, Offset: 320, BitfieldSize: 1},
	}}
	b, err := btf.NewBuilder([]btf.Type{task}, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func TestBTFCarveAndMembers(t *testing.T) {
	raw := testBTF(t)
	// Embedded in other bytes, as .BTF is in the kernel image.
	img := append(append(bytes.Repeat([]byte{0x9f, 0xeb}, 100), raw...), make([]byte, 100)...)
	got, err := carveBTF(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, raw) {
		t.Fatalf("carved %d bytes, want %d", len(got), len(raw))
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(got))
	if err != nil {
		t.Fatal(err)
	}
	k := &Kernel{BTF: spec}
	for _, tc := range []struct {
		s, m string
		want uint32
	}{
		{"task_struct", "tasks", 8},
		{"task_struct", "tasks.prev", 16},
		{"task_struct", "rcu_head", 24}, // inside the anonymous union
		{"task_struct", "cred", 32},
		{"cred", "uid", 4},
		{"cred", "gid.val", 8}, // through a typedef of an anonymous struct
	} {
		got, err := k.MemberOffset(tc.s, tc.m)
		if err != nil || got != tc.want {
			t.Errorf("MemberOffset(%s, %s) = %d, %v; want %d", tc.s, tc.m, got, err, tc.want)
		}
	}
	for _, tc := range [][2]string{
		{"task_struct", "nope"},
		{"task_struct", "cred.uid"}, // through a pointer
		{"task_struct", "in_execve"},
		{"no_struct", "x"},
	} {
		if got, err := k.MemberOffset(tc[0], tc[1]); err == nil {
			t.Errorf("MemberOffset(%s, %s) = %d, want an error", tc[0], tc[1], got)
		}
	}
	if sz, err := k.TypeSize("task_struct"); err != nil || sz != 64 {
		t.Errorf("TypeSize(task_struct) = %d, %v", sz, err)
	}
	if _, err := (&Kernel{}).MemberOffset("task_struct", "tasks"); !errors.Is(err, ErrNoBTF) {
		t.Errorf("without BTF: %v, want ErrNoBTF", err)
	}
}

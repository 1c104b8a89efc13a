package guestmem

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckRegisterNames(t *testing.T) {
	if err := CheckRegisterNames(map[string]uint64{"rax": 1, "r15": 2, "rip": 3, "rflags": 2}); err != nil {
		t.Errorf("general registers: %v", err)
	}
	if err := CheckRegisterNames(nil); err == nil {
		t.Errorf("no registers: accepted")
	}
	err := CheckRegisterNames(map[string]uint64{"rax": 1, "cr3": 0, "RBX": 1})
	if err == nil || !strings.Contains(err.Error(), `registers "RBX", "cr3" cannot be written`) {
		t.Errorf("cr3 and RBX: %v", err)
	}
	if !errors.Is(ErrReadOnlyRegisters, ErrReadOnly) {
		t.Errorf("ErrReadOnlyRegisters is not ErrReadOnly")
	}
}

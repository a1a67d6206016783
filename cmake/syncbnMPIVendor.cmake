# syncbn_mpi_vendor(<out-var> <include-dirs>): "MPICH", "Open MPI" or "" (unknown), read
# from the mpi.h found in <include-dirs>. The core's MPI_Comm is the built-against MPI's
# type (an int in MPICH and its ABI family, a pointer in Open MPI), so the installed
# package checks that a consumer finds an MPI of the same family.
function(syncbn_mpi_vendor out incdirs)
  set(vendor "")
  foreach(dir IN LISTS incdirs)
    if(EXISTS "${dir}/mpi.h")
      file(STRINGS "${dir}/mpi.h" defs REGEX "^#define (MPICH_VERSION|OMPI_MAJOR_VERSION)[ \t]")
      if(defs MATCHES "OMPI_MAJOR_VERSION")
        set(vendor "Open MPI")
      elseif(defs MATCHES "MPICH_VERSION")
        set(vendor "MPICH")
      endif()
      break()
    endif()
  endforeach()
  set(${out} "${vendor}" PARENT_SCOPE)
endfunction()

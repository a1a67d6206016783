# FindNCCL: NCCL's header and library, as the imported target NCCL::NCCL.
#
# NCCL ships no CMake package. Searched, in order: NCCL_ROOT (variable or environment),
# the directories in NCCL_HINTS (syncbn passes the nvidia-nccl-cu13 wheel of its Python,
# or of the environment the package is installed in), the CUDA toolkit, system paths.
#
# Sets NCCL_FOUND, NCCL_INCLUDE_DIR, NCCL_LIBRARY, NCCL_VERSION (from nccl.h).

# A cached path that is gone (pip's temporary build environment of an earlier build) is
# searched for again instead of failing at compile time.
foreach(_nccl_var NCCL_INCLUDE_DIR NCCL_LIBRARY)
  if(${_nccl_var} AND NOT EXISTS "${${_nccl_var}}")
    unset(${_nccl_var} CACHE)
  endif()
endforeach()

find_path(NCCL_INCLUDE_DIR nccl.h
          HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${NCCL_HINTS} ${CUDAToolkit_LIBRARY_ROOT}
          PATH_SUFFIXES include)
# The wheel has only the runtime name libnccl.so.2 (no libnccl.so link).
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2
             HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${NCCL_HINTS} ${CUDAToolkit_LIBRARY_ROOT}
             PATH_SUFFIXES lib lib64)

if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_defs
       REGEX "^#define NCCL_(MAJOR|MINOR|PATCH)[ \t]+[0-9]+")
  foreach(_part MAJOR MINOR PATCH)
    string(REGEX MATCH "NCCL_${_part}[ \t]+([0-9]+)" _m "${_nccl_defs}")
    set(_nccl_${_part} "${CMAKE_MATCH_1}")
  endforeach()
  if(NOT _nccl_MAJOR STREQUAL "")
    set(NCCL_VERSION "${_nccl_MAJOR}.${_nccl_MINOR}.${_nccl_PATCH}")
  endif()
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR
                                  VERSION_VAR NCCL_VERSION)

if(NCCL_FOUND AND NOT TARGET NCCL::NCCL)
  add_library(NCCL::NCCL UNKNOWN IMPORTED)
  set_target_properties(NCCL::NCCL PROPERTIES
    IMPORTED_LOCATION "${NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
endif()
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)
